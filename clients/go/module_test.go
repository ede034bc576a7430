package idemd_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// An application module can depend on this one by its module path, as the README says (with a
// replace directive until a release is tagged), and build against the documented API.
func TestModuleIsUsableFromAnotherModule(t *testing.T) {
	here, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	app := t.TempDir()
	files := map[string]string{
		"go.mod": "module example.com/app\n\ngo 1.26\n\nrequire github.com/idemd/idemd/clients/go v0.0.0\n\nreplace github.com/idemd/idemd/clients/go => " + here + "\n",
		"main.go": `package main

import (
	"context"
	"errors"
	"fmt"

	idemd "github.com/idemd/idemd/clients/go"
)

func main() {
	client, err := idemd.New("127.0.0.1:1", idemd.WithToken("t"))
	if err != nil {
		panic(err)
	}
	defer client.Close()
	_, err = client.Idempotent(context.Background(), "payments", "order-1", map[string]any{"amount": 1},
		func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			return idemd.Result{Body: []byte("ok")}, nil
		}, idemd.WithMaxAttempts(1))
	fmt.Println(errors.Is(err, idemd.ErrUnavailable))
}
`,
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(app, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// -mod=mod lets go resolve the application's requirements (from the module cache) without a
	// go.sum written by hand.
	command := exec.Command("go", "run", "-mod=mod", ".")
	command.Dir = app
	var stderr strings.Builder
	command.Stderr = &stderr // go's own progress lines ("go: downloading …") go there
	output, err := command.Output()
	if err != nil {
		t.Fatalf("go run in an application module: %v\n%s%s", err, output, stderr.String())
	}
	if string(output) != "true\n" {
		t.Fatalf("the application printed %q, want true (a closed port is ErrUnavailable)", output)
	}
}
