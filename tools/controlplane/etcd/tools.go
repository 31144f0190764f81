//go:build tools

// Keeps the etcd server command in this module's graph (go mod tidy drops unused requirements).
package tools

import _ "go.etcd.io/etcd/server/v3"
