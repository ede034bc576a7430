package httpidem

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"strconv"
)

// errHijack: a protected handler cannot take the connection over, since its response must be
// captured to be stored.
var errHijack = errors.New("httpidem: a handler under the Idempotency-Key middleware cannot hijack the connection")

// responseCapture is the http.ResponseWriter a protected handler writes to. It keeps the status,
// the headers as they were when the status was written, and the body, and sends nothing until
// send: the response is stored with Complete before the caller sees it, so a retry sent the moment
// the first answer arrives is a replay, never a 409.
//
// Header is the real writer's header map, so the handler sees and may change what middleware
// around it set. Flush does nothing (the response is sent whole once stored); Hijack fails; other
// http.ResponseController features (deadlines, full duplex) reach the real writer through Unwrap.
type responseCapture struct {
	w           http.ResponseWriter
	wroteHeader bool
	status      int
	header      http.Header
	body        bytes.Buffer
}

func newCapture(w http.ResponseWriter) *responseCapture {
	return &responseCapture{w: w}
}

func (c *responseCapture) Header() http.Header {
	return c.w.Header()
}

// WriteHeader keeps the first final status; an informational one (1xx but 101) goes out at once,
// as net/http sends it.
func (c *responseCapture) WriteHeader(status int) {
	if status < 100 || status > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", status)) // as net/http does
	}
	if c.wroteHeader {
		return
	}
	if status < 200 && status != http.StatusSwitchingProtocols {
		c.w.WriteHeader(status)
		return
	}
	c.wroteHeader = true
	c.status = status
	c.header = c.w.Header().Clone()
}

func (c *responseCapture) Write(data []byte) (int, error) {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	if !bodyAllowed(c.status) {
		return 0, http.ErrBodyNotAllowed
	}
	return c.body.Write(data)
}

// WriteString spares io.WriteString a copy.
func (c *responseCapture) WriteString(data string) (int, error) {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	if !bodyAllowed(c.status) {
		return 0, http.ErrBodyNotAllowed
	}
	return c.body.WriteString(data)
}

// Flush does nothing: the response is buffered until it is stored.
func (c *responseCapture) Flush() {}

// FlushError does nothing, for http.ResponseController.
func (c *responseCapture) FlushError() error { return nil }

// Hijack refuses: a hijacked connection's bytes could be neither stored nor replayed.
func (c *responseCapture) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return nil, nil, errHijack
}

// Unwrap gives http.ResponseController the real writer (read and write deadlines, full duplex).
func (c *responseCapture) Unwrap() http.ResponseWriter {
	return c.w
}

// finish is the end of the handler: a handler that wrote nothing answered 200, as with net/http.
func (c *responseCapture) finish() {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
}

// send writes the captured response to the real writer: the headers as they were at WriteHeader,
// the status and the body, with its length.
func (c *responseCapture) send() {
	c.finish()
	header := c.w.Header()
	clear(header)
	maps.Copy(header, c.header)
	writeResponse(c.w, c.status, c.body.Bytes())
}

// writeResponse sends status and body, with a Content-Length when the handler set none.
func writeResponse(w http.ResponseWriter, status int, body []byte) {
	if bodyAllowed(status) && w.Header().Get("Content-Length") == "" {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	}
	w.WriteHeader(status)
	if bodyAllowed(status) && len(body) > 0 {
		_, _ = w.Write(body) // the caller went away: nothing more to do
	}
}

// bodyAllowed is whether a response with this status may have a body (RFC 9110 §6.4.1).
func bodyAllowed(status int) bool {
	return status >= 200 && status != http.StatusNoContent && status != http.StatusNotModified
}
