// A Go caller of cowdiskd for bench/service.py: net/http over the unix socket, one
// keep-alive connection, standard library only.
//
//	cowdisk-bench-go SOCKET
//
// reads one request per line on stdin ("create ID TEMPLATE", "remove ID", "health") and
// answers each with a line "STATUS MICROSECONDS": the time from sending the request to
// the decoded answer, measured here, so the benchmark's pipe costs nothing.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cowdisk-bench-go SOCKET")
		os.Exit(2)
	}
	socket := os.Args[1]
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConnsPerHost: 1,
	}
	client := &http.Client{Transport: tr, Timeout: 5 * time.Minute}
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		var req *http.Request
		var err error
		switch {
		case f[0] == "create" && len(f) == 3:
			body, _ := json.Marshal(map[string]string{"id": f[1], "template": f[2]})
			req, err = http.NewRequest("POST", "http://cowdisk/v1/volumes", bytes.NewReader(body))
			if err == nil {
				req.Header.Set("Content-Type", "application/json")
			}
		case f[0] == "remove" && len(f) == 2:
			req, err = http.NewRequest("DELETE", "http://cowdisk/v1/volumes/"+f[1], nil)
		case f[0] == "health":
			req, err = http.NewRequest("GET", "http://cowdisk/v1/health", nil)
		default:
			err = fmt.Errorf("unknown request %q", in.Text())
		}
		if err != nil {
			fmt.Fprintf(out, "error %v\n", err)
			out.Flush()
			continue
		}
		t0 := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintf(out, "error %v\n", err)
			out.Flush()
			continue
		}
		var doc map[string]any // decoded, as a caller would
		derr := json.NewDecoder(resp.Body).Decode(&doc)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		us := time.Since(t0).Microseconds()
		if derr != nil {
			fmt.Fprintf(out, "error decode: %v\n", derr)
		} else {
			fmt.Fprintf(out, "%d %d\n", resp.StatusCode, us)
		}
		out.Flush()
	}
}
