# asyncserve on an NVIDIA GPU: the OpenAI-compatible server and chat page on port 8000.
#   docker build -t asyncserve .
#   docker run --gpus all -p 8000:8000 -v asyncserve-cache:/cache asyncserve --model Qwen/Qwen2.5-0.5B-Instruct
# The base image brings CUDA, cuDNN and a CUDA build of torch (with Triton); asyncserve installs on top of it.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

# Triton builds its small kernel launcher with the system C compiler the first time a kernel runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/asyncserve
COPY pyproject.toml setup.py README.md ./
COPY asyncserve ./asyncserve
COPY kernels ./kernels
# Pinning the image's own torch keeps pip from replacing it with a multi-gigabyte download.
RUN pip list --format=freeze | grep -i '^torch==' > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[triton]" \
    && rm /tmp/torch-constraint.txt

# Downloaded and converted models live in one volume, so a new container does not fetch them again.
ENV ASYNCSERVE_CACHE_DIR=/cache/asyncserve \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1
VOLUME ["/cache"]

EXPOSE 8000
ENTRYPOINT ["asyncserve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
