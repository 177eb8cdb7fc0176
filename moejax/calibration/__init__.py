"""The calibrated `local` HardwareSpec (docs/design.md §5); it sits above the engine
(its probes run `Engine`), so hardware presets reach it only via `set_local_loader`."""

from moejax.calibration.cache import calibration_path, local_calibration_path
from moejax.calibration.local import load_local
from moejax.calibration.microbench import calibrate
from moejax.model_config.hardware import set_local_loader

set_local_loader(load_local)

__all__ = ["calibrate", "calibration_path", "load_local", "local_calibration_path"]
