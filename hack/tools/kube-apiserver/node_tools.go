//go:build tools

// The node components, built from the same pinned k8s.io/kubernetes module as
// kube-apiserver by `hack/build-tools.sh --node` (used by `netfence node up`
// and `make node-e2e`, not by `make setup`).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
