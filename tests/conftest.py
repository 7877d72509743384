"""Every test sees 8 simulated CPU devices; TensorFlow never sees an accelerator."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The interop extra's torch build brings triton (a GPU kernel compiler), which crashes the
# process when loaded after TensorFlow; torch on CPU never needs it, so it is kept out.
sys.modules.setdefault("triton", None)
