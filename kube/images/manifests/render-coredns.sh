#!/usr/bin/env bash
# Prints coredns.yaml with its placeholders filled in:
#
#   kube/images/manifests/render-coredns.sh --dns-ip 10.96.0.10 [--cluster-domain cluster.local]
#                                           [--forward ADDRESS]...
#
# --dns-ip: the Service kube-dns's clusterIP (required); --cluster-domain: default
# cluster.local; --forward (repeatable): upstream resolvers for names outside the cluster
# (a Corefile `forward . ADDRESS...`); without one CoreDNS forwards nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() {
    echo "usage: render-coredns.sh --dns-ip IP [--cluster-domain DOMAIN] [--forward ADDRESS]..." >&2
    exit 2
}
dns_ip='' domain=cluster.local forward=()
while (($#)); do
    case $1 in
    --dns-ip) dns_ip=${2:-} ;;
    --cluster-domain) domain=${2:-} ;;
    --forward) forward+=("${2:-}") ;;
    *) usage ;;
    esac
    shift 2 || usage
done
[[ $dns_ip =~ ^[0-9a-fA-F.:]+$ && $domain =~ ^[a-z0-9.-]+$ ]] || usage
line=''
if ((${#forward[@]})); then
    for f in "${forward[@]}"; do
        [[ $f =~ ^[0-9a-zA-Z.:/_-]+$ ]] || usage
    done
    line="forward . ${forward[*]}"
fi
# The template's header (which names the placeholders) is left out.
sed -e '1,/^apiVersion:/{/^#/d}' -e "s|\${DNS_IP}|$dns_ip|g" -e "s|\${CLUSTER_DOMAIN}|$domain|g" -e "s|\${FORWARD}|$line|g" \
    "$here/coredns.yaml"
