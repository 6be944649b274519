"""Small helpers the tests share: encoding pictures, running specs through a backend, and a
test PKI (a CA, a server and a client certificate)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from augserve.backends.base import Backend
from augserve.backends.batch import Batch, SourceImage, augment_batch
from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec


def encode(image_rgb: np.ndarray, extension: str = ".png", quality: int = 95) -> bytes:
    """Encode an RGB uint8 image; PNG is lossless, so decoded pixels equal `image_rgb`."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension == ".jpg" else []
    ok, buffer = cv2.imencode(extension, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buffer.tobytes()


def spec_of(*ops: dict, **top: object) -> AugmentSpec:
    return AugmentSpec.from_dict({"ops": list(ops), **top})


def run_images(
    backend: Backend,
    spec: AugmentSpec,
    encoded: Sequence[bytes],
    seed: int = 0,
    epoch: int = 0,
    first_id: int = 0,
    policy: BadImagePolicy = BadImagePolicy(),
) -> Batch:
    sources = [SourceImage(first_id + i, 0, f"image-{first_id + i}", data) for i, data in enumerate(encoded)]
    return augment_batch(backend, spec, seed, epoch, sources, policy)


def run_one(backend: Backend, spec: AugmentSpec, image_rgb: np.ndarray, seed: int = 0, sample_id: int = 0) -> np.ndarray:
    """Augment one losslessly encoded image and return the [H, W, 3] result."""
    batch = run_images(backend, spec, [encode(image_rgb)], seed=seed, first_id=sample_id)
    assert batch.images.shape[0] == 1, batch.skipped
    return batch.images[0]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a [H, W] 0/1 mask: run lengths in column-major order,
    starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(count) for count in counts]}


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name, key, is_ca: bool, server: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, certificate: x509.Certificate, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def write_pki(folder: Path) -> dict[str, str]:
    """A self-signed CA (ca.crt), a server certificate for localhost and 127.0.0.1
    (server.crt, server.key) and a client certificate (client.crt, client.key) in `folder`;
    their paths by role."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("augserve test CA", ca_key, _name("augserve test CA"), ca_key, is_ca=True, server=False)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert, _ = _write(folder, "ca", ca, ca_key)
    server_cert, server_key_path = _write(folder, "server", _issue("127.0.0.1", ca_key, ca.subject, server_key, False, True), server_key)
    client_cert, client_key_path = _write(folder, "client", _issue("trainer", ca_key, ca.subject, client_key, False, False), client_key)
    return {"ca": ca_cert, "server_cert": server_cert, "server_key": server_key_path,
            "client_cert": client_cert, "client_key": client_key_path}
