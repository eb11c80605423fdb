import os

# Tests run Ray clusters on loopback only; token auth is on everywhere else (Ray's default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # stages/openmp.py (what the CLI and the stage actors set)
# Decode steps run eagerly in the suite: compiling them costs seconds to tens of seconds per model and
# stage split. tests/test_decode.py turns the compiled step (the default) on and checks it against eager.
os.environ.setdefault("JAMBA_DECODE", "eager")
# CI has no GPU: JAMBA_KERNELS=triton runs the Triton kernels in Triton's interpreter on CPU tensors.
# (Read when the kernels are defined, so it must be set before stages.kernels.triton_gpu is imported.)
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """One private local Ray cluster per test module (Ray takes seconds to start here); yields its
    GCS address. address="local" never joins a cluster someone else started."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The trained demo LM and classifier (models/), as the fp32 copies the commands serve."""
    from stages.demo import trained_model_dir, widen_to_fp32

    root = tmp_path_factory.mktemp("models")
    widen_to_fp32(trained_model_dir("lm"), root / "lm")
    widen_to_fp32(trained_model_dir("classification"), root / "cls")
    return root / "lm", root / "cls"


@pytest.fixture(scope="module")
def reference(models):
    """Single-process runners of the demo LM and classifier, and the tokenizer: what the pipeline
    and the service must reproduce."""
    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage
    from stages.tokenizer import Tokenizer

    lm, cls = models
    tok = Tokenizer.from_dir(lm)
    return LocalRunner(load_stage(lm)[0], tok), LocalRunner(load_stage(cls)[0], tok), tok


@pytest.fixture(scope="module")
def pki():
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def cert(subject, key, issuer, issuer_key, ca=False, sans=(), usage=None):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    return {
        "ca": cert("test CA", ca_key, "test CA", ca_key, ca=True),
        "server_cert": cert("server", server_key, "test CA", ca_key, sans=[
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            usage=ExtendedKeyUsageOID.SERVER_AUTH),
        "server_key": pem_key(server_key),
        "client_cert": cert("client", client_key, "test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        "client_key": pem_key(client_key),
    }


# The suite's process ends without the interpreter's teardown: after the whole suite (Ray, gRPC,
# numba, gloo and llguidance threads all loaded in one process) a native library crashed once in
# that teardown (a segmentation fault after "778 passed", 2026-12-04), turning a green run red.
# Everything is reported by then; the exit status is pytest's own.
_EXIT_STATUS = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "status" in _EXIT_STATUS and not os.environ.get("JAMBA_TEST_FULL_TEARDOWN"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["status"])
