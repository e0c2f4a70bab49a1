# One entry point for people and CI. Every target creates .venv and installs the project itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Caches stay inside the checkout, never in ~ (DEVELOPERS.md).
export TORCH_HOME := $(CURDIR)/.cache/torch
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE := 1
export WANDB_DIR := $(CURDIR)/.cache/wandb
export WANDB_CACHE_DIR := $(CURDIR)/.cache/wandb/cache
export WANDB_CONFIG_DIR := $(CURDIR)/.cache/wandb/config
export WANDB_DATA_DIR := $(CURDIR)/.cache/wandb/data
export WANDB_MODE ?= offline
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
PYTEST_ARGS ?=

.PHONY: install run run-pixel demo-class demo-superres demo-inpaint plan test test-slow bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default, the paper's two stages at demo scale: build the coloured-digits
# shards, train the demo's KL-f2 autoencoder on them (task=autoencoder: L1 + LPIPS + patch-GAN + KL),
# report its held-out reconstructions (eval.reconstruction), cache the digits' latents through it
# (data_pipeline.precompute; reruns reuse the autoencoder and the cache), train the tiny text-to-image
# UNet on the cached latents with DeepSpeed on the CPU, sample every digit, score the samples (digit
# recognition, FID on the digit classifier's features). W&B offline unless a key is set. ARGS go to
# the diffusion job, AE_ARGS to the autoencoder's.
# The demo's steps without train.num_threads (encoding, scoring) use the training jobs' 2 threads too,
# so a machine with more cores computes the same sums in the same order.
DEMO_THREADS := OMP_NUM_THREADS=2
DEMO_DIGITS := $(CURDIR)/.cache/data/digits16
DEMO_AE_RUN ?= runs/demo_autoencoder
DEMO_CACHE ?= $(CURDIR)/.cache/latents/demo_latent
run: install
	$(PY) -m trainer.train experiment=demo_autoencoder run_dir=$(DEMO_AE_RUN) $(AE_ARGS)
	$(DEMO_THREADS) $(PY) -m eval.reconstruction checkpoint=$(DEMO_AE_RUN) data=$(DEMO_DIGITS)/val-000000.tar features=digits \
	    digit_classifier=$(DEMO_DIGITS)/digit_classifier.json lpips_random_backbone=true overwrite=true
	ae="$$($(PY) -m trainer.autoencoder_overrides $(DEMO_AE_RUN))" && \
	$(DEMO_THREADS) $(PY) -m data_pipeline.precompute experiment=demo_latent $$ae precompute.out=$(DEMO_CACHE) && \
	$(PY) -m trainer.train experiment=demo_latent $$ae data.latent_cache=$(DEMO_CACHE) $(ARGS)

# The pixel-space variant (the paper's LDM-1): no autoencoder; the cache holds exact fp32 pixels.
PIXEL_CACHE ?= $(CURDIR)/.cache/latents/demo
run-pixel: install
	$(DEMO_THREADS) $(PY) -m data_pipeline.precompute experiment=demo precompute.out=$(PIXEL_CACHE) $(ARGS)
	$(PY) -m trainer.train experiment=demo data.latent_cache=$(PIXEL_CACHE) $(ARGS)

# Class-conditional digits, no text (issue 18): the pixel-space tiny UNet conditioned on each digit's
# class through a learned class embedding with classifier-free guidance; the eval samples every class
# equally often and reports the share recognised as the requested digit and the FID.
CLASS_CACHE ?= $(CURDIR)/.cache/latents/demo_class
demo-class: install
	$(DEMO_THREADS) $(PY) -m data_pipeline.precompute experiment=demo_class precompute.out=$(CLASS_CACHE) $(ARGS)
	$(PY) -m trainer.train experiment=demo_class data.latent_cache=$(CLASS_CACHE) $(ARGS)

# Issue 18's concat-conditioned demos on the digits, pixel space, no text: 4x super-resolution (16 px
# from 4 px; PSNR / SSIM of the model and of bicubic upsampling on the held-out digits) and inpainting
# of half-masked digits (the fraction of completions the digit classifier recognises as the original).
# Trained from the shards (a latent cache holds no images to make the concat input from).
demo-superres: install
	$(DEMO_THREADS) $(PY) -m trainer.train experiment=demo_superres $(ARGS)

demo-inpaint: install
	$(DEMO_THREADS) $(PY) -m trainer.train experiment=demo_inpaint $(ARGS)

plan: install
	$(PY) -m trainer.plan $(ARGS)

# The default suite: fast CPU tests (< ~20 min on 2 cores).
test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Heavier tests (SD-shaped parity, end-to-end runs); CI runs them as a separate step.
# pytest exits 5 when no test is marked slow; that is not a failure of this tier.
test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

bench: install
	$(PY) bench/unet_step.py
	$(PY) bench/sampling.py
	$(PY) bench/zero_memory.py

# One GPU, under 8 minutes: ldm_1p45b at 256 px and the SD v1 UNet at 512 px in bf16 from synthetic
# cached latents (img/s, MFU, peak memory beside trainer.plan, eager vs compiled, ours vs diffusers);
# the table also goes to bench/RESULTS_gpu.md. ARGS: e.g. --small (reduced sizes, any device), --no-compile.
bench-gpu: install
	$(PY) bench/gpu_suite.py --out bench/RESULTS_gpu.md $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
