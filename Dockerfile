# DeepServe's serving image: Ray's image for the same Ray and Python as the project (2.60.0,
# 3.11) plus the deepserve package with its serving dependencies only (no torch).
#   docker build -t deepserve:0.1.0 .
#   docker build -t deepserve:0.1.0-gpu --build-arg RAY_TAG=2.60.0-py311-gpu .
# Ray's tags read <ray version>-py<python>[-cpu | -gpu | -cu<cuda>]: no suffix is the CPU image,
# -gpu Ray's default CUDA build. Pushing to a registry: docs/deploy.md.
ARG RAY_TAG=2.60.0-py311
FROM rayproject/ray:${RAY_TAG}

# Filesystems for a repository URI, e.g. "s3fs" for s3://, "gcsfs" for gs:// (https:// needs none).
ARG EXTRA_PACKAGES=""

# nginx for the admission front (admission_front: services/gateway/front.py); the rest of Ray's
# image is Ubuntu's, so its package manager. The image's user is ray: back to it after.
USER root
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/*
USER ray

# Non-editable install: the package and its default Serve config go to site-packages; the
# sources are only the build's input.
COPY --chown=ray:users . /tmp/deepserve-src
RUN pip install --no-cache-dir /tmp/deepserve-src ${EXTRA_PACKAGES} && rm -rf /tmp/deepserve-src

ENV RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
    DEEPSERVE_GRPC_PORT=9000 \
    DEEPSERVE_METRICS_PORT=8080 \
    DEEPSERVE_MODEL_REPOSITORY=/models
EXPOSE 9000 8080
