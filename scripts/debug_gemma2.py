"""Temporary: which CUDA kernel makes tiny Gemma 2 differ from transformers."""
import sys, os, tempfile, torch, importlib
sys.path.insert(0, os.getcwd())
from asyncserve import LLM, SamplingParams
from asyncserve.tiny_model import build_tiny_checkpoint
from tests.conftest import PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

d = tempfile.mkdtemp()
results = {}
for family in ("gemma2", "gemma3"):
    path = build_tiny_checkpoint(os.path.join(d, family), family)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    ids = tok.encode(PROMPTS[0])
    with torch.no_grad():
        hf = model(torch.tensor([ids]).cuda()).logits[0, -1].float().log_softmax(-1).cpu()
        hf_cpu = model.cpu()(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    print(family, "hf cuda vs cpu max diff", (hf - hf_cpu).abs().max().item(), flush=True)
    for off in ("none", "attention", "norm", "activation", "rotary", "cache", "all"):
        mods = {"attention", "norm", "activation", "rotary", "cache"} if off == "all" else ({off} if off != "none" else set())
        saved = {}
        for name in mods:
            mod = importlib.import_module(f"asyncserve.kernels.{name}")
            saved[name] = mod.use_triton
            mod.use_triton = lambda t: False
        llm = LLM(path, device="cuda", dtype="float32", enforce_eager=True, num_gpu_blocks_override=128)
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)[0]
        lp = out.outputs[0].logprobs[0]
        diff = max(abs(v.logprob - hf[k].item()) for k, v in lp.items())
        print(f"{family} reference for {off:10}: max |logprob - hf| over our top-20 = {diff:.2e}; top {list(lp)[:3]} hf {hf.topk(3).indices.tolist()}", flush=True)
        for name, fn in saved.items():
            importlib.import_module(f"asyncserve.kernels.{name}").use_triton = fn
        del llm
        torch.cuda.empty_cache()
