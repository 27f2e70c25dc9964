"""Give PEFT's closed `PeftType` enum a `GFA` member.

`peft.utils.register_peft_method` only accepts names that are members of `PeftType`, and
transformers' PEFT integration reads `config.peft_type.value`, so a plain string will not do.
The member is added the way `enum` itself stores members, which survives json, pickle and
`PeftType("GFA")`. If a future PEFT ships `PeftType.GFA`, that member is reused.
"""

from peft.utils.peft_types import PeftType


def _ensure_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


GFA_PEFT_TYPE = _ensure_member("GFA")
