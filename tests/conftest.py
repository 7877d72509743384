"""Every test sees 8 simulated CPU devices; TensorFlow never sees an accelerator."""

import os

# Simulated devices share the host's cores: on a loaded machine one of them can reach a
# collective long after the others, past XLA's 40 s CPU default that aborts the process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
