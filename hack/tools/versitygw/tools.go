//go:build tools

// Package tools pins versitygw, the S3-compatible server.
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"
