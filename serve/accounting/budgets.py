"""Spend budgets: a cap in dollars per UTC day and/or per UTC month, for one API key or several that share it.

Requests are priced as the ledger prices them: a model served here at its `serve --token-price` (what a
million prompt and completion tokens cost on this deployment's hardware, e.g. from `deploykit size`), a
spilled request at the managed endpoint's price. Before a request of a key with a budget runs, the gateway
holds its worst case (the body's bytes as prompt tokens, as no token spans less than a byte of text, plus
every token it may generate, at the dearer of its local and spill prices); when it ends, the hold becomes
what it really cost, in the same transaction as its ledger row. The check reads what is spent and held in
one transaction that locks the budget's row, so concurrent requests, in any number of gateway processes
sharing the database, can never together pass a hard cap: a request whose worst case would pass it gets a
429 that says what is left and when the window resets. A soft budget admits the request and warns instead
(response headers, /metrics). Either kind POSTs to its webhook once per window, the first time the cap is
reached. There is no key that skips the check: every key with a budget is held to it.

A gateway that dies mid-request leaves its holds behind; they lapse after `hold_s`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.serve.accounting.database import Database, Row, Run
from deploykit.serve.accounting.keys import check_name

log = logging.getLogger("deploykit.gateway")


@dataclass(frozen=True)
class Price:
    """What a million prompt and completion tokens cost, in USD."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6

    def dearer(self, other: Price | None) -> Price:
        """The higher of the two prices, part by part (a request that may go to either place)."""
        if other is None:
            return self
        return Price(max(self.input_per_mtok, other.input_per_mtok), max(self.output_per_mtok, other.output_per_mtok))


def parse_price(value: str) -> tuple[str, Price]:
    """`serve --token-price MODEL=IN/OUT` (USD per million prompt / completion tokens; one figure: both)."""
    model, sep, figures = value.partition("=")
    parts = figures.split("/")
    hint = "Write it as MODEL=IN/OUT in USD per million tokens, e.g. smollm2-135m=0.02/0.08."
    if not sep or not model or len(parts) > 2:
        raise UsageError(f"--token-price '{value}' is not MODEL=IN/OUT.", hint)
    try:
        numbers = [float(p) for p in parts]
    except ValueError as e:
        raise UsageError(f"--token-price '{value}' has a price that is not a number.", hint) from e
    if any(not n >= 0 or n == float("inf") for n in numbers):
        raise UsageError(f"--token-price '{value}' must be finite and not negative.", hint)
    return model, Price(numbers[0], numbers[-1])


@dataclass(frozen=True)
class Budget:
    name: str
    daily_usd: float | None = None
    monthly_usd: float | None = None
    hard: bool = False
    webhook: str | None = None
    created_at: float = 0.0

    def cap(self, window: str) -> float | None:
        return self.daily_usd if window == "daily" else self.monthly_usd


@dataclass(frozen=True)
class Window:
    """One budget window around a moment: the UTC day or month, its key in budget_spend, and when it resets."""

    kind: str  # daily | monthly
    period: str  # 2026-12-07 | 2026-12
    resets_at: float


def windows(at: float) -> tuple[Window, Window]:
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + dt.timedelta(days=32)).replace(day=1)
    return (
        Window("daily", day.strftime("%Y-%m-%d"), (day + dt.timedelta(days=1)).timestamp()),
        Window("monthly", month.strftime("%Y-%m"), next_month.timestamp()),
    )


@dataclass(frozen=True)
class WindowState:
    budget: Budget
    window: Window
    cap: float
    spent: float
    held: float

    @property
    def left(self) -> float:
        return self.cap - self.spent - self.held

    def sentence(self) -> str:
        return (
            f"The budget '{self.budget.name}' has ${self.spent + self.held:,.4f} of its {self.window.kind} cap of "
            f"${self.cap:,.2f} spent or held; it resets at {_iso(self.window.resets_at)}."
        )


@dataclass
class Hold:
    """A request's worst case, held against its budget until the request ends."""

    id: str
    budget: str
    usd: float
    at: float
    headers: dict[str, str] = field(default_factory=dict)


class BudgetExceeded(Exception):
    """A hard budget refused a request; `state` is the window it would have passed."""

    def __init__(self, state: WindowState, usd: float) -> None:
        super().__init__(state.sentence())
        self.state, self.usd = state, usd


Notify = Callable[[str, dict[str, object]], None]


class BudgetKeeper:
    """The gateway's side: hold a request's worst case, then settle it with its ledger row."""

    def __init__(
        self,
        db: Database,
        *,
        hold_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        notify: Notify | None = None,
    ) -> None:
        self.db, self.hold_s, self._clock = db, hold_s, clock
        self._notify = notify or post_webhook

    def hold(self, budget: str, usd: float) -> Hold | None:
        """Hold `usd` against the budget, or raise BudgetExceeded (a hard cap it would pass). None: there is no
        such budget (any more). Blocking: run it off the event loop."""
        now = self._clock()

        def work(run: Run) -> Hold | WindowState | None:
            run("UPDATE budgets SET created_at = created_at WHERE name = ?", (budget,))  # the row lock
            found = run(f"SELECT {_SELECT} FROM budgets WHERE name = ?", (budget,))
            if not found:
                return None
            spec = _budget(found[0])
            run("DELETE FROM budget_holds WHERE budget = ? AND expires_at <= ?", (budget, now))
            states = _states(run, spec, now)
            over = [s for s in states if usd > s.left]
            if over and spec.hard:
                _ensure_spend_row(run, budget, over[0].window.period)
                return over[0]
            held = Hold(uuid.uuid4().hex, budget, usd, now, _headers(states, over))
            run(
                "INSERT INTO budget_holds (id, budget, usd, expires_at) VALUES (?, ?, ?, ?)",
                (held.id, budget, usd, now + self.hold_s),
            )
            return held

        result = self.db.exclusive(work)
        if isinstance(result, WindowState):
            self._first_time(result)
            raise BudgetExceeded(result, usd)
        return result

    def settlement(self, hold: Hold, cost: float) -> Settlement:
        return Settlement(self, hold, cost)

    def release(self, hold: Hold) -> None:
        """Drop a hold whose request never ran (blocking)."""
        self.db.execute("DELETE FROM budget_holds WHERE id = ?", (hold.id,))

    def exposition(self) -> str:
        """Prometheus text for every budget: its caps, what is spent in the current windows, what is held."""
        states = budget_states(self.db, self._clock())
        lines = []
        for what, help_ in (
            ("cap", "A spend budget's cap for the current UTC window."),
            ("spent", "Dollars spent against a budget in the current window."),
            ("held", "Dollars held by a budget's requests in flight."),
        ):
            name = f"deploykit_budget_{what}_usd"
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            for s in states:
                labels = f'budget="{s.budget.name}",window="{s.window.kind}",hard="{str(s.budget.hard).lower()}"'
                lines.append(f"{name}{{{labels}}} {float(getattr(s, what))!r}")
        return "\n".join(lines) + "\n" if states else ""

    def _first_time(self, state: WindowState) -> None:
        """POST the budget's webhook if this window's cap has not been announced yet (once, across gateways)."""
        claimed = self.db.execute(
            "UPDATE budget_spend SET notified = 1 WHERE budget = ? AND period = ? AND notified = 0",
            (state.budget.name, state.window.period),
        )
        if claimed and state.budget.webhook:
            self._notify(state.budget.webhook, _event(state))


@dataclass
class Settlement:
    """A request's hold turned into what it cost: committed with its ledger row (Ledger.record's `work`)."""

    keeper: BudgetKeeper
    hold: Hold
    cost: float
    reached: list[WindowState] = field(default_factory=list)

    def apply(self, run: Run) -> None:
        hold = self.hold
        run("DELETE FROM budget_holds WHERE id = ?", (hold.id,))
        found = run(f"SELECT {_SELECT} FROM budgets WHERE name = ?", (hold.budget,))
        spec = _budget(found[0]) if found else None
        self.reached = []
        for window in windows(hold.at):
            _ensure_spend_row(run, hold.budget, window.period)
            [(spent, notified)] = run(
                "UPDATE budget_spend SET spent_usd = spent_usd + ? WHERE budget = ? AND period = ? "
                "RETURNING spent_usd, notified",
                (self.cost, hold.budget, window.period),
            )
            cap = spec.cap(window.kind) if spec is not None else None
            if spec is not None and cap is not None and spent >= cap and not notified:
                claim = "UPDATE budget_spend SET notified = 1 WHERE budget = ? AND period = ?"
                run(claim, (hold.budget, window.period))
                self.reached.append(WindowState(spec, window, cap, spent, 0.0))

    def committed(self) -> None:
        for state in self.reached:
            if state.budget.webhook:
                self.keeper._notify(state.budget.webhook, _event(state))


def set_budget(
    db: Database,
    name: str,
    *,
    daily_usd: float | None = None,
    monthly_usd: float | None = None,
    hard: bool | None = None,
    webhook: str | None = None,
    keys: Sequence[str] = (),
    now: float | None = None,
) -> Budget:
    """Create a budget, or change what is given of an existing one, and attach keys (by name or id) to it. A
    budget named as a key, set with no `keys`, is that key's own. A new budget is soft unless `hard`."""
    now = time.time() if now is None else now
    check_name(name, "budget")
    for label, value in (("--daily", daily_usd), ("--monthly", monthly_usd)):
        if value is not None and not 0 < value < float("inf"):
            raise UsageError(f"{label} must be a positive number of dollars (got {value}).", "E.g. --monthly 50.")
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        raise UsageError(f"--webhook '{webhook}' is not an http(s) URL.", "E.g. --webhook https://hooks.example/x.")
    found = db.query(f"SELECT {_SELECT} FROM budgets WHERE name = ?", (name,))
    old = _budget(found[0]) if found else Budget(name, created_at=now)
    budget = Budget(
        name,
        old.daily_usd if daily_usd is None else daily_usd,
        old.monthly_usd if monthly_usd is None else monthly_usd,
        old.hard if hard is None else hard,
        old.webhook if webhook is None else webhook,
        old.created_at,
    )
    if budget.daily_usd is None and budget.monthly_usd is None:
        raise UsageError(f"The budget '{name}' needs a cap.", "Give --monthly USD, --daily USD, or both.")
    own = "SELECT id FROM api_keys WHERE name = ?"
    targets = [_key_id(db, k) for k in keys] if keys else [row[0] for row in db.query(own, (name,))]
    values = tuple(int(v) if isinstance(v, bool) else v for v in dataclasses.astuple(budget))
    updates = ", ".join(f"{f} = ?" for f in _FIELDS[1:-1])
    db.atomic(
        [
            (
                f"INSERT INTO budgets ({_SELECT}) VALUES ({', '.join('?' * len(_FIELDS))}) "
                "ON CONFLICT (name) DO NOTHING",
                values,
            ),
            (f"UPDATE budgets SET {updates} WHERE name = ?", (*values[1:-1], name)),
            *(("UPDATE api_keys SET budget = ? WHERE id = ?", (name, key_id)) for key_id in targets),
        ]
    )
    return get_budget(db, name)


def get_budget(db: Database, name: str) -> Budget:
    found = db.query(f"SELECT {_SELECT} FROM budgets WHERE name = ?", (name,))
    if not found:
        known = ", ".join(b.name for b in list_budgets(db)) or "none yet"
        raise NotFoundError(f"No budget named '{name}'.", f"Known budgets: {known} (`deploykit keys budget NAME`).")
    return _budget(found[0])


def list_budgets(db: Database) -> list[Budget]:
    return [_budget(row) for row in db.query(f"SELECT {_SELECT} FROM budgets ORDER BY name")]


def budget_states(db: Database, now: float | None = None) -> list[WindowState]:
    """Every budget's capped windows now: cap, spent and held."""
    now = time.time() if now is None else now
    return [state for budget in list_budgets(db) for state in _states(db.query, budget, now)]


def keys_of(db: Database, budget: str) -> list[str]:
    return [row[0] for row in db.query("SELECT name FROM api_keys WHERE budget = ? ORDER BY name", (budget,))]


def post_webhook(url: str, event: dict[str, object]) -> None:
    """POST the event as JSON on a thread of its own (a slow receiver never holds up a request); failures are
    logged."""

    def send() -> None:
        request = urllib.request.Request(
            url, json.dumps(event).encode(), {"content-type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10):  # an http(s) URL, checked when set
                pass
        except OSError as e:
            log.warning("budget webhook %s failed: %s", url, e)

    threading.Thread(target=send, name="deploykit-budget-webhook", daemon=True).start()


_FIELDS = tuple(f.name for f in dataclasses.fields(Budget))
_SELECT = ", ".join(_FIELDS)


def _budget(row: Row) -> Budget:
    values = dict(zip(_FIELDS, row, strict=True))
    values["hard"] = bool(values["hard"])
    return Budget(**values)


def _states(run: Run, budget: Budget, now: float) -> list[WindowState]:
    [(held,)] = run(
        "SELECT COALESCE(SUM(usd), 0) FROM budget_holds WHERE budget = ? AND expires_at > ?", (budget.name, now)
    )
    states = []
    for window in windows(now):
        cap = budget.cap(window.kind)
        if cap is None:
            continue
        found = run("SELECT spent_usd FROM budget_spend WHERE budget = ? AND period = ?", (budget.name, window.period))
        states.append(WindowState(budget, window, cap, float(found[0][0]) if found else 0.0, float(held)))
    return states


def _ensure_spend_row(run: Run, budget: str, period: str) -> None:
    run(
        "INSERT INTO budget_spend (budget, period, spent_usd, notified) VALUES (?, ?, 0, 0) "
        "ON CONFLICT (budget, period) DO NOTHING",
        (budget, period),
    )


def _headers(states: Sequence[WindowState], over: Sequence[WindowState]) -> dict[str, str]:
    """The tightest window's figures, for the client; a soft budget's warning when this request passes a cap."""
    if not states:
        return {}
    tightest = min(states, key=lambda s: s.left)
    headers = {
        "x-deploykit-budget": tightest.budget.name,
        "x-deploykit-budget-remaining-usd": f"{max(0.0, tightest.left):.6f}",
        "x-deploykit-budget-reset": _iso(tightest.window.resets_at),
    }
    if over:
        headers["x-deploykit-budget-warning"] = f"over the soft {over[0].window.kind} cap of ${over[0].cap:,.2f}"
    return headers


def _event(state: WindowState) -> dict[str, object]:
    kind = "hard" if state.budget.hard else "soft"
    return {
        "event": "budget.cap_reached",
        "budget": state.budget.name,
        "window": state.window.kind,
        "period": state.window.period,
        "cap_usd": state.cap,
        "spent_usd": state.spent,
        "hard": state.budget.hard,
        "resets_at": _iso(state.window.resets_at),
        "text": f"deploykit: the {kind} {state.window.kind} budget '{state.budget.name}' reached its cap of "
        f"${state.cap:,.2f} ({state.window.period}).",
    }


def _key_id(db: Database, name_or_id: str) -> str:
    found = db.query("SELECT id FROM api_keys WHERE name = ? OR id = ?", (name_or_id, name_or_id))
    if not found:
        raise NotFoundError(f"No API key named '{name_or_id}'.", "See `deploykit keys list`.")
    return str(found[0][0])


def _iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
