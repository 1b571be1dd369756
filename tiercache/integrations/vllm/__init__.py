"""vLLM: ``TierCacheConnector``, a KV connector that keeps an engine's prefix KV in tiercache.

``kv_connector_module_path`` ``tiercache.integrations.vllm`` names this package.
"""

from tiercache.integrations.vllm.groups import to_engine_blocks, to_store_blocks
from tiercache.integrations.vllm.options import ConnectorConfigError, Options, model_fingerprint
from tiercache.integrations.vllm.scheduler import TierCacheConnector

__all__ = [
    "ConnectorConfigError",
    "Options",
    "TierCacheConnector",
    "model_fingerprint",
    "to_engine_blocks",
    "to_store_blocks",
]
