"""A harness that runs ncclep's vLLM prepare/finalize classes through the calls vLLM makes, on hosts
with or without vLLM (the GPU hosts have none: see :mod:`.stand_ins`).

``driver.run_rank(backend)`` on every rank of a process group; ``tests/test_vllm_harness.py`` (CPU,
reference backend) and ``tests/gpu/test_vllm_harness_gpu.py`` (CUDA backend) run it. Importing this
package imports no vLLM name and installs nothing.
"""
