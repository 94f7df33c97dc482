# Sourced by run_gpu.sh and run_regimes_gpu.sh (from the repository root):
# the environment a GPU machine's run needs. Installs the wheels carried in
# .whl/ (jaxopt, the data packages) into /tmp/site, puts this checkout's
# grain_optax and examples' imports first on PYTHONPATH (the image has no
# installed grain_optax), and points MINILM_DIR at the fp16 export carried
# in .gpu/minilm (examples/minilm.py --export DIR --fp16) when present.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ -d .gpu/minilm ]; then export MINILM_DIR=$PWD/.gpu/minilm; fi
