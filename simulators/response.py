"""Customer response: the exact outcome probabilities of any action for any customer.

Pure functions of the population state; the same function gives the simulator the
probabilities it samples from and gives ground truth (expected reward of every action) to
oracles and evaluators, so there is one response model and no sampling noise in the truth.

Funnel for action ``a = (channel c, offer o, timing t)`` and customer ``i``::

    deliver  = deliver[c] * (app user, for app push)
    open     = min(1, open[c] * affinity[i, c] * adoption(i, c) * timing(i, t)
                      / (1 + drop * fatigue[i]))
    click    = click[c]
    convert  = min(1, need[i, o] * held[i, o] * triggers(i, o) * adoption(i, o)
                      * human_boost[c, o])
    P(conversion) = deliver * open * click * convert
    P(complaint)  = deliver * min(1, complaint[c] * (1 + k * sens[i] * fatigue[i]) * off_hours)
    P(opt-out)    = deliver * min(1, opt_out[c] * (1 + k * sens[i] * fatigue[i]))
    E[reward]     = P(conversion) * value[o] - cost[c] - complaint_penalty * P(complaint)

The no-contact action has all probabilities 0 and reward 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.segments import DORMANT_AFTER_DAYS
from simulators.population import Population
from simulators.scenario import Scenario

QUIET_START, QUIET_END = 21, 8
"""Hours outside which an immediate contact counts as off-hours for complaints and opens."""


@dataclass(frozen=True)
class ResponseModel:
    """Scenario x catalogue tables read by :func:`outcome_probabilities`."""

    deliver: np.ndarray  # (C,)
    open: np.ndarray  # (C,)
    click: np.ndarray  # (C,)
    human_boost: np.ndarray  # (C, O)
    value: np.ndarray  # (O,)
    cost: np.ndarray  # (C,)
    complaint_base: np.ndarray  # (C,)
    opt_out_base: np.ndarray  # (C,)
    slot_start: np.ndarray  # (T,) -1 for immediate
    slot_end: np.ndarray  # (T,)
    app_push: int  # channel index of app push, -1 if absent
    mortgage_offer: int  # offer index of the mortgage rate offer, -1 if absent
    renewal_offers: np.ndarray  # (O,) bool: wealth and deposit offers
    winback_offers: np.ndarray  # (O,) bool
    activation_offers: np.ndarray  # (O,) bool: e-channel activation
    app_open_factor: np.ndarray  # (4,) by adoption stage
    activation_need_factor: np.ndarray  # (4,) by adoption stage
    channel_index: np.ndarray  # (A,) -1 for no contact
    offer_index: np.ndarray  # (A,)
    timing_index: np.ndarray  # (A,)
    scenario: Scenario

    @classmethod
    def build(cls, scenario: Scenario, catalog: ActionCatalog) -> ResponseModel:
        beh = scenario.behaviour
        funnel = [beh.channel_funnel[c] for c in catalog.channel_names]
        human = np.array([c.human for c in catalog.channels])
        family_boost = np.array(
            [beh.human_channel_boost.get(o.family, 1.0) for o in catalog.offers], np.float32
        )
        boost = np.where(human[:, None], family_boost[None, :], 1.0).astype(np.float32)
        names = catalog.offer_names
        return cls(
            deliver=np.array([f.deliver for f in funnel], np.float32),
            open=np.array([f.open for f in funnel], np.float32),
            click=np.array([f.click for f in funnel], np.float32),
            human_boost=boost,
            value=np.array([o.value_cny for o in catalog.offers], np.float32),
            cost=np.array([c.cost_cny for c in catalog.channels], np.float32),
            complaint_base=np.array(
                [beh.complaint.base_rate[c] for c in catalog.channel_names], np.float32
            ),
            opt_out_base=np.array(
                [beh.opt_out.base_rate[c] for c in catalog.channel_names], np.float32
            ),
            slot_start=np.array(
                [-1 if t.start_hour is None else t.start_hour for t in catalog.timing], np.int16
            ),
            slot_end=np.array(
                [-1 if t.end_hour is None else t.end_hour for t in catalog.timing], np.int16
            ),
            app_push=catalog.channel_names.index("app_push")
            if "app_push" in catalog.channel_names
            else -1,
            mortgage_offer=names.index("mortgage_rate_offer")
            if "mortgage_rate_offer" in names
            else -1,
            renewal_offers=np.array(
                [o.family in ("investment", "deposit") for o in catalog.offers], bool
            ),
            winback_offers=np.array([o.name == "winback_perk" for o in catalog.offers], bool),
            activation_offers=np.array(
                [o.name == "echannel_activation" for o in catalog.offers], bool
            ),
            app_open_factor=np.array(beh.adoption.app_open_factor, np.float32),
            activation_need_factor=np.array(beh.adoption.activation_need_factor, np.float32),
            channel_index=catalog.channel_index.astype(np.int64),
            offer_index=catalog.offer_index.astype(np.int64),
            timing_index=catalog.timing_index.astype(np.int64),
            scenario=scenario,
        )


ADOPTION_STAGES = ("never", "lapsed", "occasional", "frequent")


def adoption_stage(days_since_last_login: np.ndarray, app_logins_30d: np.ndarray) -> np.ndarray:
    """E-channel adoption stage, index into :data:`ADOPTION_STAGES`, int64 of the input shape:
    never signed in (no login ever), lapsed (none for 30+ days), occasional, frequent (4+)."""
    return np.where(
        np.isinf(days_since_last_login),
        0,
        np.where(days_since_last_login > 30, 1, np.where(app_logins_30d >= 4, 3, 2)),
    )


@dataclass(frozen=True)
class Outcome:
    """Outcome probabilities and expected reward; every array has the broadcast shape of
    (customers, actions) given to :func:`outcome_probabilities`."""

    deliver: np.ndarray
    opened: np.ndarray
    """P(delivered and opened)."""
    clicked: np.ndarray
    """P(delivered, opened and clicked)."""
    convert: np.ndarray
    """P(delivered, opened, clicked and converted)."""
    complaint: np.ndarray
    opt_out: np.ndarray
    cost: np.ndarray
    value: np.ndarray
    expected_reward: np.ndarray


def outcome_probabilities(
    model: ResponseModel,
    pop: Population,
    customers: np.ndarray,
    actions: np.ndarray,
    hour: np.ndarray,
) -> Outcome:
    """Exact outcome probabilities for customer/action index arrays that broadcast together.

    Parameters
    ----------
    model : ResponseModel
    pop : Population
    customers : int array, shape (n,) or (n, 1)
    actions : int array, shape (n,) or (1, A)
        Catalogue action ids (0 is no contact).
    hour : int array, shape (N,)
        Today's local decision hour of every customer of ``pop``.

    Returns
    -------
    Outcome
        Arrays of the broadcast shape, e.g. (n,) for one action per customer or (n, A) for
        every action (ground truth).
    """
    beh = model.scenario.behaviour
    contact = model.channel_index[actions] >= 0
    ch = np.maximum(model.channel_index[actions], 0)
    of = np.maximum(model.offer_index[actions], 0)
    ts = np.maximum(model.timing_index[actions], 0)

    fatigue = pop.fatigue[customers]
    sensitivity = pop.fatigue_sensitivity[customers]
    now_hour = hour[customers].astype(np.int16)
    preferred = pop.preferred_hour[customers].astype(np.int16)

    deliver = model.deliver[ch]
    stage = adoption_stage(pop.days_since_last_login[customers], pop.app_logins_30d[customers])
    is_push = ch == model.app_push
    if beh.app_push_needs_app_user and model.app_push >= 0:
        app_user = stage >= 2
        deliver = np.where(is_push & ~app_user, np.float32(0.02), deliver)

    start, end = model.slot_start[ts], model.slot_end[ts]
    immediate = start < 0
    in_window = np.where(
        immediate,
        np.abs(now_hour - preferred) <= 1,
        (preferred >= start) & (preferred < end),
    )
    timing = np.where(
        in_window,
        np.float32(beh.timing.preferred_window_boost),
        np.float32(beh.timing.off_window_factor),
    )
    off_hours = immediate & ((now_hour >= QUIET_START) | (now_hour < QUIET_END))
    timing = np.where(off_hours, timing * np.float32(beh.timing.now_off_hours_factor), timing)
    adoption = np.where(is_push, model.app_open_factor[stage], np.float32(1.0))
    p_open = np.minimum(
        1.0,
        model.open[ch]
        * pop.affinity[customers, ch]
        * adoption
        * timing
        / (1.0 + np.float32(beh.fatigue.response_drop) * fatigue),
    )

    need = pop.need[customers, of] * np.where(
        pop.holds[customers, of], np.float32(beh.held_need_factor), np.float32(1.0)
    )
    trig = beh.triggers
    if model.mortgage_offer >= 0:
        browsing = pop.mortgage_page_views_7d[customers] >= trig.mortgage_views_threshold
        need = np.where(
            (of == model.mortgage_offer) & browsing,
            need * np.float32(trig.mortgage_offer_boost),
            need,
        )
    maturing = pop.days_to_product_maturity[customers] <= trig.maturity_days
    need = np.where(
        model.renewal_offers[of] & maturing, need * np.float32(trig.maturity_renewal_boost), need
    )
    need = np.where(model.activation_offers[of], need * model.activation_need_factor[stage], need)
    dormant = pop.days_since_last_login[customers] > DORMANT_AFTER_DAYS  # as the segment
    need = np.where(
        model.winback_offers[of] & dormant, need * np.float32(trig.dormant_winback_boost), need
    )
    p_convert_click = np.minimum(1.0, need * model.human_boost[ch, of])
    opened = deliver * p_open
    clicked = opened * model.click[ch]
    convert = clicked * p_convert_click

    pressure = 1.0 + sensitivity * fatigue
    complaint = deliver * np.minimum(
        1.0,
        model.complaint_base[ch]
        * (1.0 + np.float32(beh.complaint.fatigue_factor) * (pressure - 1.0))
        * np.where(off_hours, np.float32(beh.complaint.off_hours_factor), np.float32(1.0)),
    )
    opt_out = deliver * np.minimum(
        1.0,
        model.opt_out_base[ch] * (1.0 + np.float32(beh.opt_out.fatigue_factor) * (pressure - 1.0)),
    )
    zero = np.float32(0.0)
    convert = np.where(contact, convert, zero)
    complaint = np.where(contact, complaint, zero)
    opt_out = np.where(contact, opt_out, zero)
    shape = convert.shape
    cost = np.broadcast_to(np.where(contact, model.cost[ch], zero), shape)
    value = np.broadcast_to(np.where(contact, model.value[of], zero), shape)
    expected = (
        convert * value - cost - np.float32(model.scenario.reward.complaint_penalty_cny) * complaint
    )
    return Outcome(
        deliver=np.broadcast_to(np.where(contact, deliver, zero), shape),
        opened=np.broadcast_to(np.where(contact, opened, zero), shape),
        clicked=np.broadcast_to(np.where(contact, clicked, zero), shape),
        convert=convert,
        complaint=complaint,
        opt_out=opt_out,
        cost=cost,
        value=value,
        expected_reward=expected,
    )
