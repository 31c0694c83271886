"""Build the refusal-swap training mix from benign data."""

from ..constants import DEFAULT_REFUSAL
from .builder import RefusalMix, RefusalMixBuilderConfig, build_mix, export_llava_json
from .formats import MixDataError, open_source
from .config import MixConfig
from .mix import iter_rows, plan_mix
from .sample import sample_data, write_sample_data

__all__ = ["DEFAULT_REFUSAL", "MixConfig", "MixDataError", "RefusalMix", "RefusalMixBuilderConfig", "build_mix",
           "export_llava_json", "iter_rows", "open_source", "plan_mix", "sample_data", "write_sample_data"]
