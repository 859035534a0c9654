//go:build tools

// Package tools pins kube-apiserver; build it with
// `go build k8s.io/kubernetes/cmd/kube-apiserver`.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
