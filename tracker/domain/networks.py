"""Networks that send postbacks, as the merchants file names them: profile and credentials."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    profile: str
    token: str | None = None
    hmac_secret: str | None = None
    allow_ips: tuple[str, ...] = ()


def slug(value: str) -> str:
    if not SLUG.fullmatch(value):
        raise ValueError("")  # the field's hint says what a name is
    return value


def _secret(value: str) -> str:
    if not value.strip():
        raise ValueError("")
    return value


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an address or CIDR") from None


Secret = Annotated[str, AfterValidator(_secret)]


class Entry(BaseModel):
    """An entry of the merchants file: exactly the fields it names, each of the type written."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # What a field must be, named whenever it is missing or not that (its own check says more).
    HINTS: ClassVar[dict[str, str]] = {}


class NetworkEntry(Entry):
    """A `networks:` entry. The postback profiles known are the validation's context."""
    HINTS: ClassVar[dict[str, str]] = {
        "name": "1-63 characters of a-z 0-9 _ -", "profile": "the name of a postback profile",
        "token": "a non-empty secret", "hmac_secret": "a non-empty secret",
        "allow_ips": "must be a list of strings"}
    name: Annotated[str, AfterValidator(slug)]
    profile: str | None = Field(default=None, validate_default=True)  # default: the network's name
    token: Secret | None = None
    hmac_secret: Secret | None = None
    allow_ips: list[Annotated[str, AfterValidator(_cidr)]] = []

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = info.data.get("name") if value is None else value
        profiles: Any = (info.context or {}).get("profiles", ())
        if value is not None and value not in profiles:
            raise ValueError(f"{value!r} is not one of {sorted(profiles)}")
        return value

    @model_validator(mode="after")
    def _authenticated(self) -> NetworkEntry:
        if self.token is None and self.hmac_secret is None:
            raise ValueError("needs a token or an hmac_secret: postbacks are authenticated")
        return self

    def network(self) -> Network:
        return Network(name=self.name, profile=self.profile or self.name, token=self.token,
                       hmac_secret=self.hmac_secret, allow_ips=tuple(self.allow_ips))
