#!/usr/bin/env bash
# Run here (repository root) before the device run: copies the default model's config and tokenizer into
# .gpu_carry/smollm2-shape and fetches the wheel of the one dependency the device image lacks
# (platformdirs) into .whl; both paths are git-ignored through .git/info/exclude and travel by `carry`.
set -euo pipefail
model=$(.venv/bin/python -c "from nugget2d.runtime.models import resolve_model_dir; print(resolve_model_dir())" 2>/dev/null | tail -1)
mkdir -p .gpu_carry/smollm2-shape .whl
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$model/$f" ] && cp "$model/$f" .gpu_carry/smollm2-shape/
done
version=$(.venv/bin/python -c "import platformdirs; print(platformdirs.__version__)")
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .whl "platformdirs==$version"
for p in /.whl/ /.gpu_carry/; do grep -qx "$p" .git/info/exclude || echo "$p" >> .git/info/exclude; done
du -sh .gpu_carry .whl
