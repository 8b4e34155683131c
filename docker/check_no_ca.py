"""Run INSIDE the image (docker/smoke.sh): fail if a certificate of the host's CA bundle that the
image does not carry by itself (a TLS proxy's CA, handed to the build as the `ca` secret) was left in
any file of the image.

    docker run --rm -i --network none --entrypoint python -v "$CA_BUNDLE:/host-ca/ca.pem:ro" IMAGE - \
        < docker/check_no_ca.py
"""

import os
import re
import sys

HOST_BUNDLE = "/host-ca/ca.pem"
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
TEXT_SUFFIXES = (".pem", ".crt", ".cer", ".cfg", ".conf", ".ini", ".toml", ".txt", ".json", ".yaml", ".yml")
ALWAYS = ("/etc/", "/root/", "/home/", "/tmp/", "/run/", "/opt/erc/", "/usr/local/")


def bodies(data: bytes) -> set[bytes]:
    return {b"".join(m.group(1).split()) for m in PEM.finditer(data)}


def main() -> None:
    with open(HOST_BUNDLE, "rb") as f:
        host = bodies(f.read())
    own = set()
    for path in ("/etc/ssl/certs/ca-certificates.crt",):
        if os.path.exists(path):
            with open(path, "rb") as f:
                own |= bodies(f.read())
    foreign = host - own
    if not foreign:
        print("check-ca: the host bundle holds no certificate beyond the image's own: nothing to look for")
        return
    # A line of each foreign certificate that any copy of it, however wrapped, would contain.
    needles = {body[100:140] for body in foreign}
    scanned = 0
    found = []
    for top, dirs, files in os.walk("/"):
        if top in ("/proc", "/sys", "/dev") or top.startswith(("/proc/", "/sys/", "/dev/", "/host-ca")):
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(top, name)
            if not (path.endswith(TEXT_SUFFIXES) or path.startswith(ALWAYS)):
                continue
            try:
                if not os.path.isfile(path) or os.path.getsize(path) > 8_000_000:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            scanned += 1
            flat = b"".join(data.split())
            if any(needle in flat for needle in needles):
                found.append(path)
    if found:
        print(f"check-ca: FAIL: the build's CA certificate is in the image: {', '.join(found)}")
        sys.exit(1)
    print(f"check-ca: none of the host's {len(foreign)} extra CA certificates is in the image ({scanned} files scanned)")


if __name__ == "__main__":
    main()
