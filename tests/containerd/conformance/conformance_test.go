// containerd's snapshotter conformance suite against `cowstore serve --containerd`: each
// case starts a fresh daemon on a fresh store (the command is $COWSTORE) and drives it
// through containerd's own proxy client. Built in GOPATH mode from Debian's
// golang-github-containerd-containerd-dev; tests/containerd/test_conformance.py runs it.
package conformance

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	store, sock, files := filepath.Join(root, "store"), filepath.Join(root, "snapshots.sock"), filepath.Join(root, "files")
	cowstore := os.Getenv("COWSTORE")
	if out, err := exec.Command(cowstore, "--store", store, "init", "--default-size", "256M").CombinedOutput(); err != nil {
		return nil, nil, fmt.Errorf("cowstore init: %v: %s", err, out)
	}
	if err := os.Mkdir(files, 0o700); err != nil {
		return nil, nil, err
	}
	daemon := exec.Command(cowstore, "--store", store, "serve", "--containerd", sock, "--mount", files)
	daemon.Stdout, daemon.Stderr = os.Stderr, os.Stderr
	if err := daemon.Start(); err != nil {
		return nil, nil, err
	}
	stop := func() error {
		daemon.Process.Signal(syscall.SIGTERM)
		return daemon.Wait()
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		} else if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("no socket at %s after 30 s", sock)
		}
	}
	conn, err := grpc.Dial(dialer.DialAddress(sock), grpc.WithInsecure(), grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "cowstore")
	return sn, func() error { sn.Close(); conn.Close(); return stop() }, nil
}

func TestCowstore(t *testing.T) {
	testsuite.SnapshotterSuite(t, "Proxy", newSnapshotter)
}
