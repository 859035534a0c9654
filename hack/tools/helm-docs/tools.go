//go:build tools

// Package tools pins helm-docs (the chart README generator); build it with
// `go build github.com/norwoodj/helm-docs/cmd/helm-docs`.
package tools

import _ "github.com/norwoodj/helm-docs/cmd/helm-docs"
