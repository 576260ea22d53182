"""Prometheus Alertmanager's webhook payload (version 4): read it, and word one group's notification
as a single chat message (docs/status.md "Alert routing"). Pure: no I/O, no platform.

Alertmanager posts one payload per group of alerts (its `group_by`), with every alert of the
group, firing and resolved, under `alerts`; `status` is "resolved" only when all of them are.
Payload fields: https://prometheus.io/docs/alerting/latest/configuration/#webhook_config and
`notify/webhook/webhook.go` (`Message`) with `template.Data` in prometheus/alertmanager.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from .i18n import N_, Locale, Translator, translator
from .robots import RobotMessage

VERSION = "4"
STATUSES = ("firing", "resolved")
SHOWN_APART = ("alertname", "severity")  # named in the title and the severity line, not among the labels
NO_TIME = datetime(1, 1, 1).year  # Go's zero time ("0001-01-01T00:00:00Z"): not set

FIRING = N_("Firing: {alertname}")
RESOLVED = N_("Resolved: {alertname}")
ALERT_COUNT = N_("{n} alerts")  # shown for two or more
SEVERITY = N_("Severity: {severity}")
LABELS = N_("Labels: {labels}")
STARTED = N_("Started: {time}")
ENDED = N_("Ended: {time}")
RUNBOOK = N_("Runbook")
SOURCE = N_("Source")
MORE = N_("… and {n} more")


class PayloadError(ValueError):
    """The payload is not what Alertmanager sends; `field` names where ("alerts[2].startsAt")."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@dataclass(frozen=True, slots=True)
class Alert:
    status: str  # "firing" | "resolved"
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime | None  # None: not set (a firing alert)
    generator_url: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Notification:
    group_key: str
    status: str
    receiver: str
    group_labels: Mapping[str, str]
    common_labels: Mapping[str, str]
    common_annotations: Mapping[str, str]
    external_url: str
    alerts: tuple[Alert, ...]
    truncated: int  # alerts Alertmanager left out (`max_alerts`)

    @property
    def alertname(self) -> str:
        for labels in (self.group_labels, self.common_labels, self.alerts[0].labels):
            if labels.get("alertname"):
                return labels["alertname"]
        return "?"


# -- reading --------------------------------------------------------------------------------------
def _string(data: Mapping[str, Any], key: str, where: str) -> str:
    if key not in data:
        raise PayloadError(where + key, "is required")
    value = data[key]
    if not isinstance(value, str):
        raise PayloadError(where + key, f"must be a string, got {type(value).__name__}")
    return value


def _labels(data: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise PayloadError(where + key, f"must be an object of strings, got {type(value).__name__}")
    for name, v in value.items():
        if not isinstance(v, str):
            raise PayloadError(f"{where}{key}.{name}", f"must be a string, got {type(v).__name__}")
    return value


def _status(data: Mapping[str, Any], where: str) -> str:
    status = _string(data, "status", where)
    if status not in STATUSES:
        raise PayloadError(where + "status", f'must be "firing" or "resolved", got {status!r}')
    return status


def _time(data: Mapping[str, Any], key: str, where: str) -> datetime | None:
    text = _string(data, key, where)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise PayloadError(where + key, f"must be an RFC 3339 time, got {text[:40]!r}") from None
    if value.tzinfo is None:
        raise PayloadError(where + key, f"must carry a time zone (Z or ±hh:mm), got {text[:40]!r}")
    return None if value.year == NO_TIME else value


def _alert(data: Any, where: str) -> Alert:
    if not isinstance(data, dict):
        raise PayloadError(where.rstrip("."), "must be an object")
    starts_at = _time(data, "startsAt", where)
    if starts_at is None:
        raise PayloadError(where + "startsAt", "must be set")
    return Alert(
        status=_status(data, where),
        labels=_labels(data, "labels", where),
        annotations=_labels(data, "annotations", where),
        starts_at=starts_at,
        ends_at=_time(data, "endsAt", where) if "endsAt" in data else None,
        generator_url=data.get("generatorURL", "") if isinstance(data.get("generatorURL"), str) else "",
        fingerprint=_string(data, "fingerprint", where),
    )


def parse(data: Any) -> Notification:
    """The notification in a decoded webhook body; `PayloadError` names the first wrong field."""
    if not isinstance(data, dict):
        raise PayloadError("body", "must be a JSON object (Alertmanager's webhook payload)")
    version = _string(data, "version", "")
    if version != VERSION:
        raise PayloadError("version", f'must be "{VERSION}" (Alertmanager\'s webhook payload), got {version!r}')
    alerts = data.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise PayloadError("alerts", "must be a non-empty list")
    truncated = data.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or truncated < 0:
        raise PayloadError("truncatedAlerts", "must be a whole number, 0 or more")
    return Notification(
        group_key=_string(data, "groupKey", ""),
        status=_status(data, ""),
        receiver=_string(data, "receiver", ""),
        group_labels=_labels(data, "groupLabels", ""),
        common_labels=_labels(data, "commonLabels", ""),
        common_annotations=_labels(data, "commonAnnotations", ""),
        external_url=_string(data, "externalURL", ""),
        alerts=tuple(_alert(a, f"alerts[{i}].") for i, a in enumerate(alerts)),
        truncated=truncated,
    )


# -- wording --------------------------------------------------------------------------------------
def _pairs(labels: Mapping[str, str], leave_out: Sequence[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in leave_out)


def _when(value: datetime, zone: tzinfo) -> str:
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def _block(alert: Alert, n: Notification, t: Translator, zone: tzinfo) -> str:
    """One alert of the group: its summary, what is not common to the group, its times and links."""
    notes = {**n.common_annotations, **alert.annotations}
    lines = [f"**{notes.get('summary') or alert.labels.get('alertname') or n.alertname}**"]
    if notes.get("description"):
        lines.append(notes["description"])
    if "severity" not in n.common_labels and alert.labels.get("severity"):
        lines.append(t(SEVERITY, severity=alert.labels["severity"]))
    common = [k for k, v in n.common_labels.items() if alert.labels.get(k) == v]
    own = _pairs(alert.labels, [*SHOWN_APART, *common])
    if own:
        lines.append(t(LABELS, labels=own))
    lines.append(t(STARTED, time=_when(alert.starts_at, zone)))
    if alert.status == "resolved" and alert.ends_at is not None:
        lines.append(t(ENDED, time=_when(alert.ends_at, zone)))
    links = [(RUNBOOK, notes.get("runbook_url", "")), (SOURCE, alert.generator_url)]
    shown = [f"[{t(name)}]({url})" for name, url in links if url]
    if shown:
        lines.append(" · ".join(shown))
    return "  \n".join(lines)  # two spaces: a line break in markdown, where a bare newline is not


def render(n: Notification, locale: Locale | str | None, zone: tzinfo, limit: int) -> RobotMessage:
    """The group's message, in markdown, at most `limit` UTF-8 bytes: every alert that fits (firing
    first, oldest first), then "… and N more" for the rest."""
    t = translator(locale)
    title = t(RESOLVED if n.status == "resolved" else FIRING, alertname=n.alertname)
    head = [f"### {title}"]
    if n.common_labels.get("severity"):
        head.append(t(SEVERITY, severity=n.common_labels["severity"]))
    total = len(n.alerts) + n.truncated
    if total > 1:
        head.append(t(ALERT_COUNT, n=total))
    common = _pairs(n.common_labels, SHOWN_APART)
    if common:
        head.append(t(LABELS, labels=common))
    text = "  \n".join(head)
    ordered = sorted(n.alerts, key=lambda a: (a.status != "firing", a.starts_at))
    for shown, alert in enumerate(ordered):
        candidate = f"{text}\n\n{_block(alert, n, t, zone)}"
        left = total - shown - 1
        tail = f"\n\n{t(MORE, n=left)}" if left else ""
        if len((candidate + tail).encode()) > limit:
            text += f"\n\n{t(MORE, n=total - shown)}"
            break
        text = candidate
    else:
        if n.truncated:
            text += f"\n\n{t(MORE, n=n.truncated)}"
    return RobotMessage(text, markdown=True, title=title)
