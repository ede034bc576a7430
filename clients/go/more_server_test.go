package idemd_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idempotencyv1"
)

// selfSignedCertificate writes a certificate for localhost/127.0.0.1 and its key (PEM) into dir.
func selfSignedCertificate(t *testing.T, dir string) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	certificate, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots = x509.NewCertPool()
	roots.AddCert(certificate)
	return certFile, keyFile, roots
}

func TestTLSOption(t *testing.T) {
	certFile, keyFile, roots := selfSignedCertificate(t, t.TempDir())
	server := startIdemd(t, "--tls-cert", certFile, "--tls-key", keyFile)
	ctx := testContext(t)
	secure := newClient(t, server.addr, idemd.WithTLS(&tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}))
	var runs atomic.Int32
	outcome, err := secure.Idempotent(ctx, namespace, uniqueKey("tls"), order{ID: "t"}, countingWork(&runs, "over TLS"))
	if err != nil || string(outcome.Result.Body) != "over TLS" {
		t.Fatalf("over TLS: %+v %v", outcome, err)
	}
	// A plaintext client gets no answer from a TLS listener: unreachable, fail closed.
	plain := newClient(t, server.addr)
	_, err = plain.Idempotent(ctx, namespace, uniqueKey("tls"), order{ID: "t"}, countingWork(&runs, "never"), idemd.WithMaxAttempts(1))
	if !errors.Is(err, idemd.ErrUnavailable) || runs.Load() != 1 {
		t.Fatalf("plaintext to a TLS listener: %v (work ran %d times)", err, runs.Load())
	}
}

// While the work runs, the lease is renewed in the background: it outlives its TTL many times.
func TestLeaseIsRenewedWhileTheWorkRuns(t *testing.T) {
	server := startPostgresIdemd(t)
	renewals := newRPCLog()
	client := newClient(t, server.addr, idemd.WithDialOptions(renewals.interceptor()))
	observer := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("renew")
	const ttl = 150 * time.Millisecond
	outcome, err := client.Idempotent(ctx, namespace, key, order{ID: key}, func(workCtx context.Context, lease idemd.Lease) (idemd.Result, error) {
		before, err := observer.Get(ctx, &pb.GetRequest{Namespace: namespace, Key: key})
		if err != nil {
			return idemd.Result{}, err
		}
		// Wait (polling the client's own RPC log) until three renewals went through: by then the
		// first lease's TTL has passed, and the record must still be ours, with a later expiry.
		limit := time.After(10 * time.Second)
		for renewals.count("Renew") < 3 {
			select {
			case <-workCtx.Done():
				return idemd.Result{}, context.Cause(workCtx)
			case <-limit:
				return idemd.Result{}, errors.New("fewer than 3 renewals within 10 s")
			case <-time.After(10 * time.Millisecond):
			}
		}
		after, err := observer.Get(ctx, &pb.GetRequest{Namespace: namespace, Key: key})
		if err != nil {
			return idemd.Result{}, err
		}
		if after.GetRecord().GetFencingToken() != lease.FencingToken || after.GetRecord().GetAttempts() != 1 {
			t.Errorf("the lease changed hands: %v", after.GetRecord())
		}
		if !after.GetRecord().GetLeaseExpiresAt().AsTime().After(before.GetRecord().GetLeaseExpiresAt().AsTime()) {
			t.Errorf("the lease was not extended: %v, then %v", before.GetRecord().GetLeaseExpiresAt(), after.GetRecord().GetLeaseExpiresAt())
		}
		return idemd.Result{Body: []byte("long work")}, nil
	}, idemd.WithLeaseTTL(ttl))
	if err != nil || string(outcome.Result.Body) != "long work" {
		t.Fatalf("%+v %v", outcome, err)
	}
	if failed := renewals.failures("Renew"); len(failed) > 0 {
		t.Fatalf("renewals failed: %v", failed)
	}
}

// A panicking work gives the key back: the next call runs the work at once, not after the 30 s
// lease.
func TestPanickingWorkReleasesTheKey(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("panic")
	func() {
		defer func() {
			if recovered := recover(); recovered != "boom" {
				t.Errorf("recovered %v, want the work's panic", recovered)
			}
		}()
		_, _ = client.Idempotent(ctx, namespace, key, order{ID: key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			panic("boom")
		})
	}()
	var runs atomic.Int32
	outcome, err := client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "after the panic"), idemd.WithMaxWaits(0))
	if err != nil || outcome.Replayed || runs.Load() != 1 {
		t.Fatalf("after the panic: %+v %v (runs %d)", outcome, err, runs.Load())
	}
}

// The caller gives up while its work finishes: the result is still stored (one Complete), so a
// retry replays it instead of running the work again.
func TestResultOfWorkDoneAfterCancellationIsStored(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("cancelled-after-work")
	callCtx, cancel := context.WithCancel(ctx)
	_, err := client.Idempotent(callCtx, namespace, key, order{ID: key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		cancel()
		return idemd.Result{Body: []byte("done anyway")}, nil
	})
	if err != nil {
		t.Fatalf("the finished work's result was not stored: %v", err)
	}
	var runs atomic.Int32
	outcome, err := client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "again"))
	if err != nil || !outcome.Replayed || string(outcome.Result.Body) != "done anyway" || runs.Load() != 0 {
		t.Fatalf("retry: %+v %v (runs %d)", outcome, err, runs.Load())
	}
}

// Another caller keeps the key: after WithMaxWaits rounds of Wait the call gives up.
func TestInProgressGivesUpAfterMaxWaits(t *testing.T) {
	server := startPostgresIdemd(t)
	holder := newClient(t, server.addr)
	waits := newRPCLog()
	client := newClient(t, server.addr, idemd.WithDialOptions(waits.interceptor()))
	ctx := testContext(t)
	key := uniqueKey("max-waits")
	fp, err := idemd.Fingerprint(order{ID: key})
	if err != nil {
		t.Fatal(err)
	}
	if acquired, err := holder.Acquire(ctx, &pb.AcquireRequest{Namespace: namespace, Key: key, Fingerprint: fp}); err != nil || acquired.GetOutcome() != pb.Outcome_OUTCOME_ACQUIRED {
		t.Fatalf("acquire: %v %v", acquired, err)
	}
	var runs atomic.Int32
	_, err = client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "never"),
		idemd.WithMaxWaits(2), idemd.WithWaitTimeout(20*time.Millisecond))
	if !errors.Is(err, idemd.ErrInProgress) || runs.Load() != 0 {
		t.Fatalf("got %v (work ran %d times), want ErrInProgress", err, runs.Load())
	}
	if waits.count("Wait") != 2 || waits.count("Acquire") != 3 {
		t.Fatalf("%d Waits and %d Acquires, want 2 and 3", waits.count("Wait"), waits.count("Acquire"))
	}
}

// The caller cancels while its work runs: the work sees it, and the key is released for a retry.
func TestCancelDuringWorkReleasesTheKey(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("cancel-work")
	callCtx, cancel := context.WithCancel(ctx)
	_, err := client.Idempotent(callCtx, namespace, key, order{ID: key}, func(workCtx context.Context, lease idemd.Lease) (idemd.Result, error) {
		cancel()
		<-workCtx.Done()
		return idemd.Result{}, workCtx.Err()
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	var runs atomic.Int32
	// Released: the retry acquires at once (with the 30 s lease still held it would find the key
	// in progress, and WithMaxWaits(0) gives up on the first sight of that).
	outcome, err := client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "retried"), idemd.WithMaxWaits(0))
	if err != nil || outcome.Replayed || runs.Load() != 1 {
		t.Fatalf("retry: %+v %v (runs %d)", outcome, err, runs.Load())
	}
}

// WithRetryable marks more failures as retryable: the key is released, not stored.
func TestRetryablePredicateReleases(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("predicate")
	transient := errors.New("transient")
	stored := false
	_, err := client.Idempotent(ctx, namespace, key, order{ID: key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		return idemd.Result{}, transient
	}, idemd.WithRetryable(func(err error) bool { return errors.Is(err, transient) }),
		idemd.WithCompleteOnError(func(error) (idemd.Result, bool) { stored = true; return idemd.Result{Body: []byte("stored")}, true }))
	if !errors.Is(err, transient) || stored {
		t.Fatalf("got %v (stored %v), want the work's error, released", err, stored)
	}
	var runs atomic.Int32
	outcome, err := client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "again"), idemd.WithMaxWaits(0))
	if err != nil || outcome.Replayed || runs.Load() != 1 {
		t.Fatalf("retry: %+v %v (runs %d)", outcome, err, runs.Load())
	}
}

// A work that gives up when its context is cancelled for a lost lease returns its own error; the
// caller still learns that the lease was lost.
func TestWorkGivingUpOnALostLeaseIsLeaseLost(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	thief := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("gives-up")
	_, err := client.Idempotent(ctx, namespace, key, order{ID: key}, func(workCtx context.Context, lease idemd.Lease) (idemd.Result, error) {
		if _, err := thief.Release(ctx, &pb.ReleaseRequest{Namespace: namespace, Key: key, LeaseToken: lease.Token}); err != nil {
			return idemd.Result{}, err
		}
		select {
		case <-workCtx.Done():
			return idemd.Result{}, workCtx.Err()
		case <-time.After(30 * time.Second):
			return idemd.Result{}, errors.New("the work's context was not cancelled within 30 s")
		}
	}, idemd.WithLeaseTTL(300*time.Millisecond))
	if !errors.Is(err, idemd.ErrLeaseLost) || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want the work's context.Canceled and ErrLeaseLost", err)
	}
}
