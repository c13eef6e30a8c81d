"""Bridges to other sageLLM packages. Importing this package imports none of them.

:mod:`sagellm_backend.interop.protocol` converts to and from ``isagellm-protocol``
(``pip install 'isagellm-backend[protocol]'``); see docs/protocol-interop.md.
"""

from __future__ import annotations

from sagellm_backend.interop.protocol import (
    CLASS_FOR_CODE,
    NEAREST_CODES,
    NEAREST_PROTOCOL_CODES,
    PROTOCOL_REQUIREMENT,
    CapabilityRemainder,
    ProtocolCapability,
    ProtocolCapabilityDescriptor,
    ProtocolError,
    capability_from_protocol,
    capability_to_protocol,
    enum_from_protocol,
    enum_to_protocol,
    error_code_from_protocol,
    error_code_to_protocol,
    error_from_protocol,
    error_to_protocol,
)

__all__ = [
    "CLASS_FOR_CODE",
    "NEAREST_CODES",
    "NEAREST_PROTOCOL_CODES",
    "PROTOCOL_REQUIREMENT",
    "CapabilityRemainder",
    "ProtocolCapability",
    "ProtocolCapabilityDescriptor",
    "ProtocolError",
    "capability_from_protocol",
    "capability_to_protocol",
    "enum_from_protocol",
    "enum_to_protocol",
    "error_code_from_protocol",
    "error_code_to_protocol",
    "error_from_protocol",
    "error_to_protocol",
]
