# bench/device_setup.sh - sourced from the repo root on the offline GPU machine (wheels carried in .whl/):
# installs them into /tmp/site (wheels: ../shared/device/fetch_wheels.sh deepspeed bnb, plus evaluate==0.4.6; the
# bitsandbytes wheel slimmed to its CUDA 13 libraries to fit the 64 MiB carry), builds
# DeepSpeed from its sdist with DS_BUILD_OPS=0, exports PYTHONPATH and the NCCL/NVSHMEM variables that keep NVLink
# multicast off.
W=$PWD/.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl > /tmp/pip.log 2>&1 || { echo PIPFAIL; tail -20 /tmp/pip.log; }
if [ ! -d /tmp/site/deepspeed ] && ls $W/deepspeed-*.tar.gz >/dev/null 2>&1; then
  (cd /tmp && tar xzf $W/deepspeed-*.tar.gz && cd /tmp/deepspeed-*/ && DS_BUILD_OPS=0 python3 -m pip install --no-index --no-deps --no-build-isolation --target /tmp/site . ) > /tmp/ds.log 2>&1 || { echo DSFAIL; grep -iE "error|fail" /tmp/ds.log | tail -15; }
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import torch, trl, transformers, accelerate, evaluate; print('torch', torch.__version__, 'trl', trl.__version__, 'tf', transformers.__version__, 'acc', accelerate.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
