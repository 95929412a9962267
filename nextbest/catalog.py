"""The action catalogue: channels x offers x timing slots, plus the explicit no-contact action.

Every component (simulator, models' output layers, the VW adapter, the ONNX export, the API)
reads action ids from here; nothing else hard-codes a count.

Id scheme (stable): id 0 is ``no_contact``; then, offer by offer in file order, each channel
the offer may use (in channel-file order) times each timing slot (in timing-file order).
The same config always gives the same ids, and appending an offer only appends ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from nextbest.config_loading import ConfigError, StrictModel, content_hash, load_model

NO_CONTACT = "no_contact"
NO_CONTACT_ID = 0
RISK_LEVELS = ("R1", "R2", "R3", "R4", "R5")
DEFAULT_CATALOG_DIR = Path(__file__).resolve().parent.parent / "configs" / "catalog"

OfferFamily = Literal[
    "investment",
    "deposit",
    "credit",
    "insurance",
    "pension",
    "private_banking",
    "engagement",
    "content",
]


class Channel(StrictModel):
    """A contact channel."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    remote: bool
    """True when the customer is not met in person (app, SMS, WeChat, calls)."""
    human: bool
    """True when a person (relationship manager, branch staff) makes the contact."""
    cost_cny: float = Field(ge=0)
    daily_capacity: int | None = Field(default=None, gt=0)
    """Contacts a day the bank can make on this channel across all customers (None: unlimited)."""


class TimingSlot(StrictModel):
    """When a contact is delivered, in the customer's local time."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    start_hour: int | None = Field(default=None, ge=0, le=23)
    end_hour: int | None = Field(default=None, ge=1, le=24)
    weekend: bool = False

    @model_validator(mode="after")
    def _window(self) -> TimingSlot:
        if (self.start_hour is None) != (self.end_hour is None):
            raise ValueError("start_hour and end_hour must be given together")
        if (
            self.start_hour is not None
            and self.end_hour is not None
            and self.end_hour <= self.start_hour
        ):
            raise ValueError(
                f"end_hour ({self.end_hour}) must be after start_hour ({self.start_hour})"
            )
        return self

    @property
    def immediate(self) -> bool:
        """True for the slot delivered at decision time."""
        return self.start_hour is None

    def hours(self) -> tuple[int, ...]:
        """Local hours the contact may land in (empty for an immediate slot)."""
        if self.start_hour is None or self.end_hour is None:
            return ()
        return tuple(range(self.start_hour, self.end_hour))


class Offer(StrictModel):
    """A product or content offer with its eligibility and value to the bank."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    family: OfferFamily
    description: str = ""
    risk_level: int | None = None
    """Product risk level 1..5 (R1..R5), None for non-investment offers."""
    credit: bool = False
    hnw_only: bool = False
    min_aum_cny: float = Field(default=0.0, ge=0)
    min_age: int = Field(default=18, ge=0, le=120)
    max_age: int = Field(default=120, ge=0, le=120)
    value_cny: float = Field(ge=0)
    channels: tuple[str, ...] = Field(min_length=1)

    @field_validator("risk_level", mode="before")
    @classmethod
    def _parse_risk(cls, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, str) and value in RISK_LEVELS:
            return RISK_LEVELS.index(value) + 1
        raise ValueError(f"must be one of R1..R5 or null, got {value!r}")

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = (info.context or {}).get("channels")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a channel twice: {list(value)}")
        if known is not None:
            unknown = [c for c in value if c not in known]
            if unknown:
                raise ValueError(f"unknown channel {unknown[0]!r}; known: {sorted(known)}")
        return value

    @model_validator(mode="after")
    def _ages(self) -> Offer:
        if self.max_age < self.min_age:
            raise ValueError(f"max_age ({self.max_age}) is below min_age ({self.min_age})")
        return self


class ChannelsFile(StrictModel):
    channels: tuple[Channel, ...] = Field(min_length=1)

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: tuple[Channel, ...]) -> tuple[Channel, ...]:
        _refuse_duplicates([c.name for c in value], "channel")
        return value


class TimingFile(StrictModel):
    timing: tuple[TimingSlot, ...] = Field(min_length=1)

    @field_validator("timing")
    @classmethod
    def _unique(cls, value: tuple[TimingSlot, ...]) -> tuple[TimingSlot, ...]:
        _refuse_duplicates([t.name for t in value], "timing slot")
        return value


class OffersFile(StrictModel):
    offers: tuple[Offer, ...] = Field(min_length=1)

    @field_validator("offers")
    @classmethod
    def _unique(cls, value: tuple[Offer, ...]) -> tuple[Offer, ...]:
        _refuse_duplicates([o.name for o in value], "offer")
        return value


def _refuse_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what} name {name!r}")
        if name == NO_CONTACT:
            raise ValueError(f"{what} name {NO_CONTACT!r} is reserved for the no-contact action")
        seen.add(name)


@dataclass(frozen=True, slots=True)
class Action:
    """One catalogue entry: a (channel, offer, timing) triple, or no contact."""

    id: int
    channel: str | None
    offer: str | None
    timing: str | None

    @property
    def name(self) -> str:
        """Human-readable id, ``channel:offer:timing`` or ``no_contact``."""
        if self.channel is None:
            return NO_CONTACT
        return f"{self.channel}:{self.offer}:{self.timing}"

    @property
    def is_contact(self) -> bool:
        return self.channel is not None


class ActionCatalog:
    """Channels, offers, timing slots and the actions built from them.

    Index arrays (all of shape ``(n_actions,)``, ``-1`` for the no-contact action):
    ``channel_index``, ``offer_index``, ``timing_index``.
    """

    def __init__(
        self,
        channels: tuple[Channel, ...],
        offers: tuple[Offer, ...],
        timing: tuple[TimingSlot, ...],
    ) -> None:
        self.channels = channels
        self.offers = offers
        self.timing = timing
        self.channel_names: tuple[str, ...] = tuple(c.name for c in channels)
        self.offer_names: tuple[str, ...] = tuple(o.name for o in offers)
        self.timing_names: tuple[str, ...] = tuple(t.name for t in timing)
        channel_pos = {name: i for i, name in enumerate(self.channel_names)}
        actions = [Action(NO_CONTACT_ID, None, None, None)]
        for offer in offers:
            for channel in sorted(offer.channels, key=channel_pos.__getitem__):
                for slot in timing:
                    actions.append(Action(len(actions), channel, offer.name, slot.name))
        self.actions: tuple[Action, ...] = tuple(actions)
        self._by_name = {a.name: a.id for a in actions}
        offer_pos = {name: i for i, name in enumerate(self.offer_names)}
        timing_pos = {name: i for i, name in enumerate(self.timing_names)}
        self.channel_index = np.array(
            [-1 if a.channel is None else channel_pos[a.channel] for a in actions], np.int16
        )
        self.offer_index = np.array(
            [-1 if a.offer is None else offer_pos[a.offer] for a in actions], np.int16
        )
        self.timing_index = np.array(
            [-1 if a.timing is None else timing_pos[a.timing] for a in actions], np.int16
        )
        for arr in (self.channel_index, self.offer_index, self.timing_index):
            arr.flags.writeable = False

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_offers(self) -> int:
        return len(self.offers)

    def action_id(self, name: str) -> int:
        """Id of an action given its name (``sms:fund_sip:evening`` or ``no_contact``)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown action {name!r}") from None

    def has_action(self, name: str) -> bool:
        """True when the catalogue has an action of this name."""
        return name in self._by_name

    def channel(self, name: str) -> Channel:
        return self.channels[self.channel_names.index(name)]

    def offer(self, name: str) -> Offer:
        return self.offers[self.offer_names.index(name)]

    def slot(self, name: str) -> TimingSlot:
        return self.timing[self.timing_names.index(name)]

    def attribute(self, name: str) -> list[Any]:
        """Per-action values of an action attribute (``None`` for the no-contact action).

        Attributes: ``channel``, ``offer``, ``timing`` (names), every :class:`Channel` field
        (``remote``, ``human``, ``cost_cny`` ...), every :class:`Offer` field (``risk_level``
        as 0 for no product risk, ``family``, ``credit`` ...), every :class:`TimingSlot`
        field, and ``immediate``.
        """
        if name not in ACTION_ATTRIBUTES:
            raise KeyError(f"unknown action attribute {name!r}; known: {sorted(ACTION_ATTRIBUTES)}")
        source, field = ACTION_ATTRIBUTES[name]
        values: list[Any] = []
        for action in self.actions:
            if action.channel is None:
                values.append(None)
                continue
            if source == "action":
                values.append(getattr(action, field))
                continue
            obj: Any = {
                "channel": self.channel(action.channel),
                "offer": self.offer(action.offer or ""),
                "timing": self.slot(action.timing or ""),
            }[source]
            value = getattr(obj, field)
            if name == "risk_level" and value is None:
                value = 0
            values.append(value)
        return values

    @cached_property
    def version(self) -> str:
        """Content hash of channels, offers and timing: changes whenever any of them does."""
        payload = json.dumps(
            {
                "channels": [c.model_dump() for c in self.channels],
                "offers": [o.model_dump() for o in self.offers],
                "timing": [t.model_dump() for t in self.timing],
            },
            sort_keys=True,
        )
        return content_hash(payload)

    def __repr__(self) -> str:
        return (
            f"ActionCatalog({self.n_channels} channels, {self.n_offers} offers, "
            f"{len(self.timing)} timing slots, {self.n_actions} actions, version={self.version})"
        )


ACTION_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "channel": ("action", "channel"),
    "offer": ("action", "offer"),
    "timing": ("action", "timing"),
    **{f: ("channel", f) for f in ("remote", "human", "cost_cny", "daily_capacity")},
    **{
        f: ("offer", f)
        for f in (
            "family",
            "risk_level",
            "credit",
            "hnw_only",
            "min_aum_cny",
            "min_age",
            "max_age",
            "value_cny",
        )
    },
    **{f: ("timing", f) for f in ("start_hour", "end_hour", "weekend", "immediate")},
}
"""Action attributes a compliance rule may name: attribute -> (source, field)."""


def load_catalog(directory: str | Path = DEFAULT_CATALOG_DIR) -> ActionCatalog:
    """Load ``channels.yaml``, ``offers.yaml`` and ``timing.yaml`` from ``directory``.

    Raises
    ------
    ConfigError
        Naming the file, the key and the reason for any invalid entry.
    """
    directory = Path(directory)
    channels = load_model(directory / "channels.yaml", ChannelsFile).channels
    timing = load_model(directory / "timing.yaml", TimingFile).timing
    names = {c.name for c in channels}
    offers = load_model(directory / "offers.yaml", OffersFile, context={"channels": names}).offers
    if not offers:
        raise ConfigError(directory / "offers.yaml", "offers", "no offers defined")
    return ActionCatalog(channels, offers, timing)
