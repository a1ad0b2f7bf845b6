# Sourced by the device scripts: diffusers from the carried wheels (.whl: the diffusers, importlib_metadata,
# ftfy and wcwidth wheels, and torchao for the fp8 stage, which the device image lacks, in an ignored folder named
# in the call's carry), this checkout on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  [ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
