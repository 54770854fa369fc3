//go:build tools

// Package tools pins actionlint, the GitHub Actions workflow linter the chart
// tests run over .github/workflows (tests/chart/test_workflows.py).
package tools

import _ "github.com/rhysd/actionlint/cmd/actionlint"
