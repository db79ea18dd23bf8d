//go:build tools

// Package tools pins cri-tools, whose critest is a test binary (`go test -c`), so `go install`
// cannot build it. A module of its own keeps cri-tools' dependency versions apart from
// containerd's (../go.mod): one module would resolve both to the higher of each.
package tools

import _ "sigs.k8s.io/cri-tools/pkg/validate"
