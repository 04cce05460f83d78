"""LoRA adapters on demand: the adapters registered in the database (`deploykit lora add`) loaded into the
engines of their base model through vLLM's runtime LoRA API, and served under their own names.

Every `interval_s` the gateway reads the registry and asks each ready engine what it has loaded (its
/v1/models lists adapters with their base model as `parent`): it loads what is registered and missing
(after an engine restart too), unloads what was removed, and routes each adapter's name to the engines
that hold it. An engine that is not ready serves no runtime adapter until it has been loaded again. The
engines' load and unload routes stay behind the gateway: it proxies only the inference routes, so no
client can load an adapter of its own. API keys name adapters in --models as they name models.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp

from deploykit.serve.accounting.adapters import RegisteredAdapter, list_adapters
from deploykit.serve.accounting.database import Database
from deploykit.serve.gateway.routing import Backend, Router

log = logging.getLogger("deploykit.gateway")


async def keep_adapters(router: Router, db: Database, interval_s: float = 2.0) -> None:
    """Sync forever (until cancelled); a failure is logged and retried at the next turn."""
    while True:
        try:
            await sync_adapters(router, await asyncio.to_thread(list_adapters, db))
        except Exception:
            log.exception("could not sync the LoRA adapters")
        await asyncio.sleep(interval_s)


async def sync_adapters(router: Router, registered: Sequence[RegisteredAdapter]) -> None:
    """Bring every engine's runtime adapters to the registry's, and the routes to what the engines hold."""
    changed = False
    for backend in router.replicas:
        wanted = {a.name: a for a in registered if a.model == backend.model and a.name not in backend.adapters}
        held = await _held(backend, wanted) if backend.status == "ready" else ()
        if held != backend.runtime_adapters:
            backend.runtime_adapters = held
            changed = True
    if changed:
        router.refresh()


async def _held(backend: Backend, wanted: dict[str, RegisteredAdapter]) -> tuple[str, ...]:
    """Load the wanted adapters the engine lacks and unload the runtime ones no longer wanted; what it holds."""
    try:
        async with backend.session.get(backend.url + "/v1/models") as response:
            listing = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError) as e:
        log.warning("cannot list the models of %s: %s", backend.replica, e)
        return ()
    loaded = {
        entry["id"]
        for entry in listing.get("data", [])
        if isinstance(entry, dict) and entry.get("parent") == backend.model and entry.get("id") != backend.model
    }
    for name in loaded - wanted.keys() - set(backend.adapters):
        if await _post(backend, "/v1/unload_lora_adapter", {"lora_name": name}):
            loaded.discard(name)
    for name in wanted.keys() - loaded:
        if await _post(backend, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": wanted[name].path}):
            loaded.add(name)
    return tuple(sorted(loaded & wanted.keys()))


async def _post(backend: Backend, path: str, body: dict[str, str]) -> bool:
    try:
        async with backend.session.post(backend.url + path, json=body) as response:
            if response.status == 200:
                log.info("%s %s on %s", path.rsplit("/", 1)[-1], body["lora_name"], backend.replica)
                return True
            text = await response.text()
    except aiohttp.ClientError as e:
        text = str(e)
    log.warning("%s %s on %s failed: %s", path.rsplit("/", 1)[-1], body["lora_name"], backend.replica, text[:300])
    return False
