"""GFA as a PEFT method: `GfaConfig`, `GfaModel`, `GfaLayer`, registered on import."""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from gfa_peft.tuner.config import GfaConfig
from gfa_peft.tuner.layer import GfaLayer
from gfa_peft.tuner.model import GfaModel
from gfa_peft.tuner.config import GFA_PEFT_TYPE

if GFA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="gfa", config_cls=GfaConfig, model_cls=GfaModel, prefix="gfa_")

__all__ = ["GfaConfig", "GfaLayer", "GfaModel"]
