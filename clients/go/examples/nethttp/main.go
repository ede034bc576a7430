// Command nethttp is the net/http example app of the Idempotency-Key conformance suite
// (clients/HTTP-MIDDLEWARE.md §6): the routes and handlers of "The example app contract", each
// wrapped with httpidem.Middleware as the contract configures it. It is configured by environment
// variables (PORT, IDEMD_ADDR, IDEMD_TOKEN, NAMESPACE, LEASE_MS, IDEMD_TIMEOUT_MS, EFFECTS_FILE),
// logs to stderr and exits on SIGTERM.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	idemd "github.com/idemd/idemd/clients/go"
	"github.com/idemd/idemd/clients/go/httpidem"
)

func main() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(logger); err != nil {
		logger.Error("nethttp example app", "error", err)
		os.Exit(1)
	}
}

// config is the app's environment.
type config struct {
	port         int
	idemdAddr    string
	token        string
	namespace    string
	lease        time.Duration
	idemdTimeout time.Duration
	effectsFile  string
}

func readConfig() (config, error) {
	var c config
	var err error
	required := func(name string) string {
		value := os.Getenv(name)
		if value == "" && err == nil {
			err = fmt.Errorf("%s is not set", name)
		}
		return value
	}
	milliseconds := func(name string) time.Duration {
		text := os.Getenv(name)
		if text == "" {
			return 0
		}
		ms, parseErr := strconv.ParseUint(text, 10, 31)
		if parseErr != nil && err == nil {
			err = fmt.Errorf("%s=%q is not a number of milliseconds", name, text)
		}
		return time.Duration(ms) * time.Millisecond
	}
	port, parseErr := strconv.ParseUint(required("PORT"), 10, 16)
	if parseErr != nil && err == nil {
		err = fmt.Errorf("PORT=%q is not a port", os.Getenv("PORT"))
	}
	c.port = int(port)
	c.idemdAddr = required("IDEMD_ADDR")
	c.token = os.Getenv("IDEMD_TOKEN")
	c.namespace = required("NAMESPACE")
	c.lease = milliseconds("LEASE_MS")
	c.idemdTimeout = milliseconds("IDEMD_TIMEOUT_MS")
	c.effectsFile = required("EFFECTS_FILE")
	return c, err
}

// newClient connects to IDEMD_ADDR, "http://host:port" (plaintext) or "https://host:port" (TLS).
func newClient(c config) (*idemd.Client, error) {
	var options []idemd.Option
	target := c.idemdAddr
	switch {
	case strings.HasPrefix(target, "http://"):
		target = strings.TrimPrefix(target, "http://")
	case strings.HasPrefix(target, "https://"):
		target = strings.TrimPrefix(target, "https://")
		options = append(options, idemd.WithTLS(nil))
	}
	if c.token != "" {
		options = append(options, idemd.WithToken(c.token))
	}
	return idemd.New(strings.TrimSuffix(target, "/"), options...)
}

func run(logger *slog.Logger) error {
	c, err := readConfig()
	if err != nil {
		return err
	}
	client, err := newClient(c)
	if err != nil {
		return err
	}
	defer client.Close()

	app := &app{effects: c.effectsFile}
	tenant := func(r *http.Request) string {
		if tenant := r.Header.Get("X-Tenant"); tenant != "" {
			return tenant
		}
		return "anonymous"
	}
	base := httpidem.Options{Namespace: c.namespace, LeaseTTL: c.lease, IdemdTimeout: c.idemdTimeout, Logger: logger}
	with := func(change func(*httpidem.Options)) func(http.Handler) http.Handler {
		options := base
		change(&options)
		return httpidem.Middleware(client, options)
	}
	orders := with(func(o *httpidem.Options) { o.KeyRequired, o.Scope = true, tenant })
	ordersWait := with(func(o *httpidem.Options) { o.KeyRequired, o.Scope, o.Wait = true, tenant, 10*time.Second })
	optional := with(func(o *httpidem.Options) {})
	open := with(func(o *httpidem.Options) { o.KeyRequired, o.FailOpen = true, true })

	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok")
	})
	mux.Handle("POST /orders", orders(http.HandlerFunc(app.order)))
	mux.Handle("POST /orders-wait", ordersWait(http.HandlerFunc(app.order)))
	mux.Handle("POST /notes", optional(app.logged("notes", http.StatusCreated)))
	mux.Handle("POST /open", open(app.logged("open", http.StatusCreated)))
	// Under the default configuration: GET and PUT are not among its methods, so they pass through.
	mux.Handle("GET /orders", optional(app.logged("list", http.StatusOK)))
	mux.Handle("PUT /orders/{id}", optional(app.logged("put", http.StatusOK)))

	listener, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
	if err != nil {
		return err
	}
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelError)}
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	logger.Info("listening", "address", listener.Addr().String(), "idemd", c.idemdAddr, "namespace", c.namespace)
	select {
	case err := <-served:
		return err
	case <-stop.Done():
	}
	shutdown, cancelShutdown := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelShutdown()
	if err := server.Shutdown(shutdown); err != nil {
		return err
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// app holds the side-effect log every handler run appends to.
type app struct {
	effects string
}

// effect appends "<route> <id>" to EFFECTS_FILE, in one write with O_APPEND (so lines of
// concurrent runs, and of other processes, never interleave).
func (a *app) effect(route, id string) error {
	file, err := os.OpenFile(a.effects, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	_, err = file.WriteString(route + " " + id + "\n")
	if closeErr := file.Close(); err == nil {
		err = closeErr
	}
	return err
}

// bodyID is the JSON body's "id" (as the effect shows it, "-" when absent, and as JSON).
func bodyID(r *http.Request) (string, json.RawMessage) {
	var body struct {
		ID json.RawMessage `json:"id"`
	}
	data, err := io.ReadAll(r.Body)
	if err != nil || json.Unmarshal(data, &body) != nil || body.ID == nil || string(body.ID) == "null" {
		return "-", json.RawMessage("null")
	}
	var text string
	if json.Unmarshal(body.ID, &text) == nil {
		return text, body.ID
	}
	return string(body.ID), body.ID
}

// order is the order handler of the contract.
func (a *app) order(w http.ResponseWriter, r *http.Request) {
	id, idJSON := bodyID(r)
	if err := a.effect("orders", id); err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
		return
	}
	if delay, err := strconv.ParseUint(r.Header.Get("X-Delay-Ms"), 10, 31); err == nil {
		timer := time.NewTimer(time.Duration(delay) * time.Millisecond)
		select {
		case <-timer.C:
		case <-r.Context().Done(): // the caller left, or the lease was lost: answer now
			timer.Stop()
		}
	}
	run := newUUID()
	if r.Header.Get("X-Fail") == "1" {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "failed"})
		return
	}
	if status, err := strconv.Atoi(r.Header.Get("X-Status")); err == nil && status >= 200 && status <= 599 {
		writeJSON(w, status, map[string]any{"status": status, "run": run})
		return
	}
	tenant := r.Header.Get("X-Tenant")
	if tenant == "" {
		tenant = "anonymous"
	}
	w.Header().Set("Location", "/orders/"+run)
	w.Header().Set("Set-Cookie", "s="+run)
	w.Header().Set("X-Run", run)
	writeJSON(w, http.StatusCreated, map[string]any{"run": run, "id": idJSON, "tenant": tenant})
}

// logged is a handler that appends "<route> <id>" and answers status with {"run": R}.
func (a *app) logged(route string, status int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, _ := bodyID(r)
		if err := a.effect(route, id); err != nil {
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, status, map[string]string{"run": newUUID()})
	})
}

func writeJSON(w http.ResponseWriter, status int, value any) {
	body, err := json.Marshal(value)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"error":"cannot encode the answer"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// newUUID is a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go ≥ 1.24)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
