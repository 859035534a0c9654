//go:build tools

// Package tools pins CoreDNS, the cluster DNS of `netfence node up`; build it
// with `go build github.com/coredns/coredns` (hack/build-tools.sh --node).
package tools

import _ "github.com/coredns/coredns"
