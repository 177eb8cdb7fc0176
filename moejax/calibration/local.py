"""`load_local`: the calibrated `local` HardwareSpec, read from its cache or measured."""

from __future__ import annotations

import contextlib
import logging
import os

from moejax.calibration import cache, microbench
from moejax.model_config.hardware import HardwareSpec


def load_local(path: str | None = None, recalibrate: bool = False,
               model=None) -> HardwareSpec:
    """The cached `local` spec, calibrated (and cached) when absent, unusable or
    `recalibrate`; with `model`, its expert shape's cache and measurements. A lock lets
    one process calibrate while others wait and reuse its result."""
    path = os.path.expanduser(path) if path else cache.local_calibration_path(model)
    if not recalibrate:
        with contextlib.suppress(ValueError):
            return cache.read_cache(path, model)
    with cache.lock(path):
        if not recalibrate:
            try:  # calibrated by another process while this one waited
                return cache.read_cache(path, model)
            except ValueError as e:
                if os.path.exists(path):
                    logging.warning("calibration cache %s unusable (%s); recalibrating",
                                    path, e)
        logging.warning("calibrating this machine (1-3 minutes; cached in %s)", path)
        return microbench.calibrate(model if model is not None else "mixtral_4l_1024",
                                    path=path)
