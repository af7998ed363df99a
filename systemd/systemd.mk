# llama-proxy as a system service on a Debian/Ubuntu host (included from the Makefile):
#   sudo make install-service     the user, /opt/llama-proxy, /etc/llama-proxy, the data dir, the unit
#   sudo make uninstall-service   all of that but the data and the code (PURGE=1: those too)
#   sudo make service-token ARGS="alice 24"   generate_token.py as the service runs it
# Both are idempotent: run install-service again after changing the code; config.toml and the env
# file are never overwritten. Uses $(PY), $(SUDO) and `make install` from the Makefile.
ifndef LLAMA_PROXY_SYSTEMD_MK
LLAMA_PROXY_SYSTEMD_MK := 1

# The paths are the unit's (systemd/llama-proxy.service): change them there too, or not at all.
SERVICE      := llama-proxy
SERVICE_USER := llama-proxy
SERVICE_HOME := /opt/llama-proxy
SERVICE_ETC  := /etc/llama-proxy
SERVICE_DATA := /var/lib/llama-proxy
SERVICE_UNIT := /etc/systemd/system/$(SERVICE).service
# Left out when a checkout elsewhere is copied to $(SERVICE_HOME), which the copy replaces whole
# but for its .venv (keep nothing of yours there).
SERVICE_SKIP := ./.git ./.venv ./data ./build ./dist *.egg-info __pycache__ .pytest_cache \
                .ruff_cache .hypothesis .schemathesis .import_linter_cache
SYSTEMD_UP   := [ -d /run/systemd/system ]

.PHONY: install-service uninstall-service service-token

install-service:
	@echo "==> [1/4] the code and its .venv in $(SERVICE_HOME)"
	@if [ "$(CURDIR)" != "$(SERVICE_HOME)" ]; then \
	  echo "    copying $(CURDIR) there (owned by root, read-only to the service), then make install"; \
	  $(SUDO) rm -rf $(SERVICE_HOME).new; \
	  $(SUDO) install -d -m 0755 -o root -g root $(SERVICE_HOME).new $(SERVICE_HOME); \
	  tar -C $(CURDIR) $(foreach p,$(SERVICE_SKIP),--exclude='$(p)') --owner=root --group=root \
	    --mode=go+rX,go-w -cf - . | $(SUDO) tar -C $(SERVICE_HOME).new -xf -; \
	  if $(SUDO) test -d $(SERVICE_HOME)/.venv; then \
	    $(SUDO) mv $(SERVICE_HOME)/.venv $(SERVICE_HOME).new/.venv; fi; \
	  $(SUDO) rm -rf $(SERVICE_HOME); $(SUDO) mv $(SERVICE_HOME).new $(SERVICE_HOME); \
	  $(SUDO) $(MAKE) --no-print-directory -C $(SERVICE_HOME) install; \
	elif ! $(PY) -c 'import proxy, config, aiohttp' 2>/dev/null; then \
	  $(MAKE) --no-print-directory install; \
	else echo "    this checkout, installed (after a git pull: make install, then this again)"; fi
	@echo "==> [2/4] user $(SERVICE_USER), $(SERVICE_ETC) (config.toml, env), $(SERVICE_DATA)"
	@getent passwd $(SERVICE_USER) >/dev/null || $(SUDO) useradd --system --user-group \
	  --home-dir $(SERVICE_DATA) --no-create-home --shell /usr/sbin/nologin \
	  --comment "llama-proxy appliance" $(SERVICE_USER)
	@$(SUDO) install -d -m 0750 -o root -g $(SERVICE_USER) $(SERVICE_ETC)
	@$(SUDO) test -e $(SERVICE_ETC)/config.toml || { echo "    new $(SERVICE_ETC)/config.toml"; \
	  $(SUDO) install -m 0640 $(SERVICE_HOME)/config/example.toml $(SERVICE_ETC)/config.toml; }
	@$(SUDO) chown root:$(SERVICE_USER) $(SERVICE_ETC)/config.toml
	@$(SUDO) chmod 0640 $(SERVICE_ETC)/config.toml
	@$(SUDO) test -e $(SERVICE_ETC)/env || { echo "    new $(SERVICE_ETC)/env (for secrets)"; \
	  $(SUDO) install -m 0600 $(SERVICE_HOME)/systemd/env.example $(SERVICE_ETC)/env; }
	@$(SUDO) chown root:root $(SERVICE_ETC)/env
	@$(SUDO) chmod 0600 $(SERVICE_ETC)/env
	@$(SUDO) install -d -m 0700 -o $(SERVICE_USER) -g $(SERVICE_USER) $(SERVICE_DATA)
	@$(SUDO) chown -R $(SERVICE_USER):$(SERVICE_USER) $(SERVICE_DATA)
	@echo "==> [3/4] $(SERVICE_UNIT)"
	@$(SUDO) install -m 0644 -o root -g root $(SERVICE_HOME)/systemd/llama-proxy.service $(SERVICE_UNIT)
	@# ProtectHome= hides /home, /root and /run/user: a venv made from a Python there (pyenv)
	@# gets that Python bound back in, read-only, by a drop-in.
	@base=$$($(SERVICE_HOME)/.venv/bin/python -c 'import sys; print(sys.base_prefix)'); \
	case "$$base/" in \
	  /home/*|/root/*|/run/user/*) echo "    the venv's Python is in $$base: a drop-in binds it in"; \
	    $(SUDO) install -d -m 0755 $(SERVICE_UNIT).d; \
	    printf '%s\n' "# Written by make install-service: the venv's Python is under a home directory." \
	      "[Service]" "ProtectHome=tmpfs" "BindReadOnlyPaths=$$base" \
	      | $(SUDO) tee $(SERVICE_UNIT).d/python.conf >/dev/null;; \
	  *) $(SUDO) rm -f $(SERVICE_UNIT).d/python.conf; \
	    $(SUDO) rmdir $(SERVICE_UNIT).d 2>/dev/null || true;; \
	esac
	@if command -v systemd-analyze >/dev/null; then \
	  out=$$($(SUDO) systemd-analyze verify $(SERVICE_UNIT) 2>&1) || true; \
	  if [ -n "$$out" ]; then echo "$$out"; echo "systemd-analyze verify: see above"; exit 1; fi; \
	  echo "    systemd-analyze verify: clean"; fi
	@echo "==> [4/4] enable and (re)start $(SERVICE)"
	@if $(SYSTEMD_UP); then \
	  $(SUDO) systemctl daemon-reload && $(SUDO) systemctl enable --quiet $(SERVICE) && \
	  $(SUDO) systemctl restart $(SERVICE) && \
	  echo "    started. Follow it: journalctl -u $(SERVICE) -f   Secrets: sudoedit $(SERVICE_ETC)/env"; \
	else echo "    systemd is not running here (a container?): installed, not started"; fi

uninstall-service:
	@echo "==> removing $(SERVICE): the unit, $(SERVICE_ETC), user $(SERVICE_USER)"
	@if $(SYSTEMD_UP); then $(SUDO) systemctl disable --now --quiet $(SERVICE) 2>/dev/null || true; fi
	@$(SUDO) rm -rf $(SERVICE_UNIT) $(SERVICE_UNIT).d
	@if $(SYSTEMD_UP); then $(SUDO) systemctl daemon-reload; \
	  $(SUDO) systemctl reset-failed $(SERVICE) 2>/dev/null || true; fi
	@$(SUDO) rm -rf $(SERVICE_ETC)
	@if getent passwd $(SERVICE_USER) >/dev/null; then $(SUDO) userdel $(SERVICE_USER); fi
	@if getent group $(SERVICE_USER) >/dev/null; then $(SUDO) groupdel $(SERVICE_USER); fi
	@if [ "$(PURGE)" = 1 ]; then \
	  echo "    PURGE=1: removing $(SERVICE_DATA)"; $(SUDO) rm -rf $(SERVICE_DATA); \
	  if [ "$(CURDIR)" != "$(SERVICE_HOME)" ]; then \
	    echo "    PURGE=1: removing $(SERVICE_HOME)"; $(SUDO) rm -rf $(SERVICE_HOME); \
	  else echo "    kept $(SERVICE_HOME): it is this checkout"; fi; \
	else echo "    kept $(SERVICE_DATA) (keys, conversations) and $(SERVICE_HOME);" \
	  "make uninstall-service PURGE=1 removes them too"; fi

# A credential from generate_token.py, run as the service runs: its user, data dir and env file
# (where systemd is not PID 1, a container, through the imitation the tests start the unit with).
service-token:
	@if $(SYSTEMD_UP); then \
	  $(SUDO) systemd-run --quiet --pipe --wait --collect --uid=$(SERVICE_USER) \
	    --gid=$(SERVICE_USER) --working-directory=$(SERVICE_HOME) \
	    -p EnvironmentFile=$(SERVICE_ETC)/env -p UMask=0077 \
	    -E LLAMA_PROXY_CONFIG=$(SERVICE_ETC)/config.toml -E LLAMA_PROXY_DATA_DIR=$(SERVICE_DATA) \
	    $(SERVICE_HOME)/.venv/bin/python generate_token.py $(ARGS); \
	else \
	  $(SUDO) $(SERVICE_HOME)/.venv/bin/python $(SERVICE_HOME)/tests/deploy/imitate.py $(SERVICE_UNIT) \
	    -- $(SERVICE_HOME)/.venv/bin/python generate_token.py $(ARGS); \
	fi

endif
