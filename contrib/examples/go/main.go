// A Go caller of cowdiskd: net/http over the unix socket, standard library only.
//
//	go run . /run/cowdisk/cowdisk.sock base
//
// creates a volume over template "base", prints its stable link and Firecracker drive,
// checkpoints, restores and removes it, and shows the error document of a missing
// volume. tests/host/test_daemon.py runs it.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

// APIError is the daemon's error document: {"error": {...}}, the CLI's --json error.
type APIError struct {
	Type     string `json:"type"`
	ExitCode int    `json:"exit_code"`
	Message  string `json:"message"`
	Hint     string `json:"hint"`
	Op       string `json:"op"`
	Object   string `json:"object"`
	Errno    *int   `json:"errno"`
	Status   int    `json:"-"`
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (HTTP %d, exit %d): %s", e.Type, e.Status, e.ExitCode, e.Message)
}

// Volume is the daemon's volume document.
type Volume struct {
	ID         string  `json:"id"`
	TemplateID string  `json:"template_id"`
	Backend    string  `json:"backend"`
	State      string  `json:"state"`
	Size       int64   `json:"size"`
	Device     *string `json:"device"`
	Link       string  `json:"link"`
}

// Client calls cowdiskd on its unix socket.
type Client struct{ http *http.Client }

func New(socket string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &Client{http: &http.Client{Transport: tr, Timeout: 5 * time.Minute}}
}

func (c *Client) call(method, path string, in, out any) error {
	var body *bytes.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	} else {
		body = bytes.NewReader(nil)
	}
	req, err := http.NewRequest(method, "http://cowdisk"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 {
		var doc struct{ Error APIError }
		if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		doc.Error.Status = resp.StatusCode
		return &doc.Error
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: go run . SOCKET TEMPLATE")
		os.Exit(2)
	}
	c := New(os.Args[1])
	var v Volume
	must(c.call("POST", "/v1/volumes", map[string]string{"id": "go-sandbox", "template": os.Args[2]}, &v))
	fmt.Printf("created %s: %s, link %s\n", v.ID, v.State, v.Link)

	var drive struct {
		Config map[string]any `json:"config"`
	}
	must(c.call("GET", "/v1/volumes/go-sandbox/drive?format=firecracker", nil, &drive))
	fmt.Printf("firecracker drive: %v\n", drive.Config)

	must(c.call("POST", "/v1/volumes/go-sandbox/checkpoint", nil, &v))
	fmt.Printf("checkpointed: %s\n", v.State)
	must(c.call("POST", "/v1/volumes/go-sandbox/restore", map[string]any{}, &v))
	fmt.Printf("restored: %s\n", v.State)

	err := c.call("GET", "/v1/volumes/no-such-volume", nil, nil)
	if e, ok := err.(*APIError); ok {
		fmt.Printf("error %s (exit %d): %s\n", e.Type, e.ExitCode, e.Message)
	} else {
		must(fmt.Errorf("expected an APIError, got %v", err))
	}
	must(c.call("DELETE", "/v1/volumes/go-sandbox", nil, nil))
	fmt.Println("removed go-sandbox")
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}
