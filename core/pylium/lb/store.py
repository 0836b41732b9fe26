"""Services in the KV store, so every node sees the same ones (Cilium keeps them in
Kubernetes; here the KV store is the cluster's source of truth):

  pylium/state/services/v1/svc/<name>   the service (JSON, `Service.to_json`)
  pylium/state/services/v1/id/<id>      <name>: the cluster-wide id (= rev-NAT index),
                                        claimed with a create-if-absent
  pylium/state/services/v1/maglev-seed  the Maglev seed every node hashes with

Writes are not attached to a lease: services outlive the agent that created them."""

from __future__ import annotations

import json

from pylium.api.kvstore import KVStore
from pylium.errors import UserError
from pylium.lb.maglev import new_seed
from pylium.lb.model import Service

PREFIX = "pylium/state/services/v1/"
SVC_PREFIX = PREFIX + "svc/"
ID_PREFIX = PREFIX + "id/"
SEED_KEY = PREFIX + "maglev-seed"
#: the rev-NAT index is 16 bits in the datapath; a NodePort frontend uses id + 0x8000
MAX_SERVICE_ID = 0x7FFF


class ServiceStore:
    def __init__(self, kvstore: KVStore):
        self.kv = kvstore

    async def list(self) -> list[Service]:
        out = []
        for item in await self.kv.list(SVC_PREFIX):
            out.append(decode(item.key, item.value))
        return sorted(out, key=lambda s: s.id)

    async def get(self, name_or_id: str) -> Service | None:
        if name_or_id.isdigit():
            item = await self.kv.get(ID_PREFIX + name_or_id)
            if item is None:
                return None
            name_or_id = item.value.decode()
        item = await self.kv.get(SVC_PREFIX + name_or_id)
        return decode(item.key, item.value) if item is not None else None

    async def put(self, service: Service) -> Service:
        """Create or replace; keeps the id of an existing service of that name."""
        others = [s for s in await self.list() if s.name != service.name]
        for other in others:
            if other.frontend == service.frontend:
                raise UserError(f"frontend {service.frontend} is already service "
                                f"{other.name} (id {other.id})")
            if (service.node_port and other.node_port == service.node_port
                    and other.frontend.protocol == service.frontend.protocol):
                raise UserError(f"node port {service.node_port}/{service.frontend.protocol} "
                                f"is already service {other.name} (id {other.id})")
        existing = await self.kv.get(SVC_PREFIX + service.name)
        if existing is not None:
            svc_id = decode(existing.key, existing.value).id
        else:
            svc_id = await self._claim_id(service.name, {s.id for s in others})
        stored = Service(service.name, service.frontend, service.backends, service.type,
                         service.algorithm, service.affinity_timeout, service.traffic_policy,
                         svc_id, service.node_port)
        await self.kv.put(SVC_PREFIX + service.name, json.dumps(stored.to_json()).encode())
        return stored

    async def _claim_id(self, name: str, taken: set[int]) -> int:
        for candidate in range(1, MAX_SERVICE_ID + 1):
            if candidate in taken:
                continue
            if await self.kv.create(ID_PREFIX + str(candidate), name.encode()):
                return candidate
            holder = await self.kv.get(ID_PREFIX + str(candidate))
            if holder is not None and holder.value.decode() == name:
                return candidate  # an earlier attempt for this name claimed it
        raise UserError(f"no free service id left (all {MAX_SERVICE_ID} in use)")

    async def delete(self, name_or_id: str) -> Service | None:
        service = await self.get(name_or_id)
        if service is None:
            return None
        await self.kv.delete(SVC_PREFIX + service.name)
        await self.kv.delete(ID_PREFIX + str(service.id))
        return service

    async def restore(self, services: list[Service], seed: str) -> int:
        """After the store lost its data: write back services (with their ids) and the
        Maglev seed this node still applies, unless another node already did. Returns how
        many services this node wrote."""
        if seed:
            await self.kv.create(SEED_KEY, seed.encode())
        written = 0
        for service in services:
            if await self.kv.create(SVC_PREFIX + service.name,
                                    json.dumps(service.to_json()).encode()):
                written += 1
            await self.kv.create(ID_PREFIX + str(service.id), service.name.encode())
        return written

    async def maglev_seed(self) -> str:
        """The cluster's seed: the first node to ask creates it, every node reads it."""
        await self.kv.create(SEED_KEY, new_seed().encode())
        item = await self.kv.get(SEED_KEY)
        if item is None:
            raise UserError("maglev seed vanished from the KV store")
        return item.value.decode()


def decode(key: str, value: bytes) -> Service:
    body = json.loads(value)
    return Service.from_json(key[len(SVC_PREFIX):], body)
