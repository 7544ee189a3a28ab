# vla-ray on CPU: Python, torch's CPU wheel, MuJoCo with off-screen EGL rendering, this project.
#
#   docker build -t vla-ray:cpu .
#   docker run --rm vla-ray:cpu quickstart --help
#   docker run --rm -v "$PWD/runs:/work/runs" vla-ray:cpu quickstart --output runs/quickstart
#
# The CUDA variant is docker/Dockerfile.cuda; cluster.yaml's `docker:` block runs both.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MUJOCO_GL=egl

# Off-screen rendering: EGL through Mesa (osmesa for MUJOCO_GL=osmesa), as .ci/run installs;
# rsync for the Ray cluster launcher's file mounts.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libegl1 libegl-mesa0 libgl1 libosmesa6 rsync \
    && rm -rf /var/lib/apt/lists/*

# torch's CPU wheel first (the default index's wheel carries CUDA libraries: ~2 GB more)
RUN pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/vla-ray
COPY pyproject.toml README.md ./
COPY vla_ray ./vla_ray
COPY algorithms ./algorithms
COPY envs ./envs
COPY serve ./serve
# [export]: ONNX for `vla-ray export` and the quickstart's serving stage; [plot]: its report
RUN pip install -q ".[export,plot]"

WORKDIR /work
ENTRYPOINT ["vla-ray"]
CMD ["--help"]
