"""Write the ``openAPIV3Schema`` of a KubeRay CRD (its ``v1`` version) as gzipped JSON, descriptions dropped.

    git clone --branch v1.5.1 <kuberay repository> kuberay
    python tests/data/kuberay/extract.py kuberay/ray-operator/config/crd/bases/ray.io_rayclusters.yaml \
        tests/data/kuberay/rayclusters-v1.5.1.schema.json.gz

Only the schema is kept (no printer columns, no v1alpha1), and only the ``description`` texts are
removed (a property *named* description is kept): 140-200 KiB of JSON, 8-12 KiB gzipped.
"""
import gzip
import json
import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: ({pk: strip(pv) for pk, pv in v.items()} if k == "properties" else strip(v))
                for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(crd_yaml: str, out: str) -> None:
    with open(crd_yaml) as f:
        crd = yaml.safe_load(f)
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    data = json.dumps(strip(v1["schema"]["openAPIV3Schema"]), separators=(",", ":"), sort_keys=True).encode()
    with open(out, "wb") as f:
        f.write(gzip.compress(data, mtime=0))


if __name__ == "__main__":
    main(*sys.argv[1:])
