//go:build tools

// Package tools pins kube-score, the security/best-practice scanner the chart
// tests run over the rendered Helm chart (tests/chart/test_security_scan.py).
//
// kube-score rather than kube-linter: the Go module proxy answers 403 for every
// version of golang.stackrox.io/kube-linter (and github.com/stackrox/kube-linter).
package tools

import _ "github.com/zegl/kube-score/cmd/kube-score"
