python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
timeout 100 python -m pytest -x -k "group or shared" tests/test_gpu_kernels.py -p no:cacheprovider > $OUT/gpu-kernels.log 2>&1; echo tests rc $?; tail -3 $OUT/gpu-kernels.log
timeout 200 python scripts/quick_decode.py --rows resident full --kernel-tuning benchmarks/results/h200-kernel-tuning-exact.json --profile resident --out $OUT/quick.json > $OUT/quick.log 2>&1; echo quick rc $?; grep "tok/s" $OUT/quick.log
