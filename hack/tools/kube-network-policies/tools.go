//go:build tools

// Package tools pins kube-network-policies, the SIG Network reference
// NetworkPolicy enforcer (nftables + nfqueue) that bench/peer_bench.py compares
// Netfence with; build it with `go build sigs.k8s.io/kube-network-policies/cmd`
// (hack/build-tools.sh --peer).
package tools

import _ "sigs.k8s.io/kube-network-policies/cmd"
