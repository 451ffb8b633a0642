// A grpc-go client for scripts/bench.py: the same figures as its grpcio clients (sequential
// GetJob calls per second, one reader of a job's whole output), from a Go client, so that
// what a Go client meets on the wire (write coalescing, window updates, pings) is measured
// too. Built by the bench in GOPATH mode from Debian's golang-google-grpc-dev; prints one
// JSON line.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"sort"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	pb "jwbench/pb"
)

func main() {
	addr := flag.String("addr", "", "host:port")
	certs := flag.String("certs", "", "directory with ca-cert.pem, admin-client-{cert,key}.pem")
	mode := flag.String("mode", "unary", "unary or stream")
	job := flag.String("job", "1", "job id")
	seconds := flag.Float64("seconds", 3, "unary: measuring window")
	flag.Parse()

	pair, err := tls.LoadX509KeyPair(*certs+"/admin-client-cert.pem", *certs+"/admin-client-key.pem")
	check(err)
	caPEM, err := ioutil.ReadFile(*certs + "/ca-cert.pem")
	check(err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{pair}, RootCAs: pool, ServerName: "localhost",
		MinVersion: tls.VersionTLS13,
	})
	conn, err := grpc.Dial(*addr, grpc.WithTransportCredentials(creds), grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20)))
	check(err)
	defer conn.Close()
	client := pb.NewJobServiceClient(conn)
	ctx := context.Background()

	out := map[string]interface{}{"mode": *mode}
	switch *mode {
	case "unary":
		for i := 0; i < 50; i++ { // warm up
			_, err := client.GetJob(ctx, &pb.GetJobReq{Id: *job})
			check(err)
		}
		var latencies []float64
		start := time.Now()
		deadline := start.Add(time.Duration(*seconds * float64(time.Second)))
		for time.Now().Before(deadline) {
			t := time.Now()
			_, err := client.GetJob(ctx, &pb.GetJobReq{Id: *job})
			check(err)
			latencies = append(latencies, time.Since(t).Seconds())
		}
		wall := time.Since(start).Seconds()
		sort.Float64s(latencies)
		out["calls"] = len(latencies)
		out["per_s"] = float64(len(latencies)) / wall
		out["p50_ms"] = latencies[len(latencies)/2] * 1000
		out["p99_ms"] = latencies[len(latencies)*99/100] * 1000
	case "stream":
		start := time.Now()
		stream, err := client.GetJobsStream(ctx, &pb.GetJobsStreamReq{Id: *job})
		check(err)
		total := 0
		for {
			chunk, err := stream.Recv()
			if err == io.EOF {
				break
			}
			check(err)
			total += len(chunk.Payload)
		}
		wall := time.Since(start).Seconds()
		out["bytes"] = total
		out["mb_per_s"] = float64(total) / wall / 1e6
	default:
		check(fmt.Errorf("unknown mode %q", *mode))
	}
	check(json.NewEncoder(os.Stdout).Encode(out))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench_go:", err)
		os.Exit(1)
	}
}
