"""Temporary: why tiny Gemma 2 differs on CUDA. Kernel with cap 5 at the tiny shapes; engine with the
attention cap removed in both."""
import sys, os, tempfile, json, torch
sys.path.insert(0, os.getcwd())
from asyncserve import LLM, SamplingParams
from asyncserve.tiny_model import build_tiny_checkpoint
from asyncserve import kernels
from tests.kernels.conftest import build_paged_batch, attention_args
from tests.conftest import PROMPTS, hf_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

for cap in (None, 5.0, 50.0):
    for dtype in (torch.float32, torch.bfloat16):
        for hd in (256,):
            b = build_paged_batch([37, 9, 70], [37, 9, 5], 4, 2, hd, 16, dtype=dtype, device="cuda")
            b.query *= 4
            args = attention_args(b)
            out = kernels.paged_attention(*args, softcap=cap, sliding_window=8)
            ref = kernels.paged_attention_ref(*args, softcap=cap, sliding_window=8)
            print("prefill cap", cap, dtype, hd, (out.float() - ref.float()).abs().max().item(), flush=True)
d = tempfile.mkdtemp()
for family in ("gemma2",):
    path = build_tiny_checkpoint(os.path.join(d, family), family)
    cfg = json.load(open(os.path.join(path, "config.json")))
    print({k: cfg.get(k) for k in ("head_dim", "hidden_size", "num_attention_heads", "num_key_value_heads", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types")})
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    for eager in (True,):
        llm = LLM(path, device="cuda", dtype="float32", enforce_eager=eager, num_gpu_blocks_override=256)
        for p in PROMPTS[:3]:
            ids = tok.encode(p)
            ours = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
            print(len(ids), ours, hf_greedy(model, ids, 6), flush=True)
        # first-token logits comparison
        ids = tok.encode(PROMPTS[0])
        with torch.no_grad():
            hl = model(torch.tensor([ids]).cuda()).logits[0, -1]
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
        print("hf top", hl.log_softmax(-1).topk(5), "ours", out.outputs[0].logprobs[0])
        del llm
