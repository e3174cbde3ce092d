{{/*
TLS on every hop (values: tls). Each workload (a service entry, Triton) has its own certificate
in a Secret holding tls.crt, tls.key and ca.crt: made by cert-manager from a Certificate the
chart renders (certificates.yaml), or one the operator manages (tls.existingSecrets). The Secret
is mounted at tls.mountPath; the Loupe services read it through LOUPE_TLS_*, Triton through its
--grpc-*-ssl flags. Pods that only call the gateway (the index Job, the helm test) mount the
gateway's ca.crt alone, never a private key.
*/}}

{{/* The workloads with a certificate: the rendered service entries and the chart's Triton. */}}
{{- define "loupe.tlsWorkloads" -}}
{{- $names := splitList " " (include "loupe.renderedServices" .) }}
{{- if include "loupe.tritonRendered" . }}
{{- $names = append $names "triton" }}
{{- end }}
{{- join " " $names }}
{{- end }}

{{/*
The Secret of one workload's certificate. Usage: include "loupe.tlsSecretName" (list $ "gateway")
*/}}
{{- define "loupe.tlsSecretName" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- if eq $root.Values.tls.source "existingSecrets" }}
{{- index $root.Values.tls.existingSecrets $name }}
{{- else }}
{{- printf "%s-tls" (include "loupe.componentName" (list $root (include "loupe.serviceComponent" $name))) }}
{{- end }}
{{- end }}

{{/* The Secret volume of one workload's certificate. Usage: include "loupe.tlsVolume" (list $ "gateway") */}}
{{- define "loupe.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "loupe.tlsSecretName" . }}
    # Readable by the pod's group (fsGroup), not by others.
    defaultMode: 0440
{{- end }}

{{/* The gateway's CA alone (no key): for pods that call the gateway only. */}}
{{- define "loupe.tlsCaVolume" -}}
- name: tls-ca
  secret:
    secretName: {{ include "loupe.tlsSecretName" (list . "gateway") }}
    items:
      - key: ca.crt
        path: ca.crt
    defaultMode: 0444
{{- end }}

{{- define "loupe.tlsMount" -}}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}

{{/*
The LOUPE_TLS_* of a Loupe service entry that must agree with the pod spec (the mounted files),
as YAML; LOUPE_TLS_CLIENT_AUTH is set with the derived env (loupe.serviceEnv), so a service's
env may change it.
Usage: include "loupe.tlsEnv" $ | fromYaml
*/}}
{{- define "loupe.tlsEnv" -}}
{{- $dir := .Values.tls.mountPath }}
LOUPE_TLS: "on"
LOUPE_TLS_CERT: {{ printf "%s/tls.crt" $dir | quote }}
LOUPE_TLS_KEY: {{ printf "%s/tls.key" $dir | quote }}
LOUPE_TLS_CA: {{ printf "%s/ca.crt" $dir | quote }}
LOUPE_HEALTH_PORT: {{ .Values.tls.healthPort | toString | quote }}
{{- end }}

{{/* Triton's gRPC endpoint with TLS, client certificates required. */}}
{{- define "loupe.tritonTlsArgs" -}}
{{- $dir := .Values.tls.mountPath }}
- --grpc-use-ssl=true
- --grpc-use-ssl-mutual=true
- --grpc-server-cert={{ $dir }}/tls.crt
- --grpc-server-key={{ $dir }}/tls.key
- --grpc-root-cert={{ $dir }}/ca.crt
{{- end }}

{{/* The DNS names of a workload's Service, as its callers dial it. */}}
{{- define "loupe.tlsDnsNames" -}}
{{- $root := index . 0 }}
{{- $service := include "loupe.componentName" (list $root (include "loupe.serviceComponent" (index . 1))) }}
{{- $ns := $root.Release.Namespace }}
{{- $names := list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.%s" $service $ns $root.Values.tls.certManager.clusterDomain) }}
{{- if eq (index . 1) "gateway" }}
{{- $names = concat $names $root.Values.tls.certManager.gatewayDnsNames }}
{{- end }}
{{- /* The headless Service its callers balance over (_balancing.tpl). */}}
{{- $names = concat $names (include "loupe.headlessDnsNames" . | fromYamlArray) }}
{{- toYaml $names }}
{{- end }}

{{/*
What the chosen source needs, which a schema cannot check, and the schema's checks again for a
helm that skipped it.
*/}}
{{- define "loupe.validateTls" -}}
{{- if .Values.tls.enabled }}
{{- $t := .Values.tls }}
{{- if not (has $t.source (list "certManager" "existingSecrets")) }}
{{- fail (printf "tls.source=%q: expected certManager or existingSecrets" $t.source) }}
{{- end }}
{{- if not (has $t.certManager.issuerRef.kind (list "Issuer" "ClusterIssuer")) }}
{{- fail (printf "tls.certManager.issuerRef.kind=%q: expected Issuer or ClusterIssuer" $t.certManager.issuerRef.kind) }}
{{- end }}
{{- range $key := list "duration" "renewBefore" }}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$" (index $t.certManager $key | toString)) }}
{{- fail (printf "tls.certManager.%s=%q: expected a duration such as 2160h" $key (index $t.certManager $key)) }}
{{- end }}
{{- end }}
{{- if or (lt (int $t.healthPort) 1) (gt (int $t.healthPort) 65535) }}
{{- fail (printf "tls.healthPort=%v: expected a port, 1 to 65535" $t.healthPort) }}
{{- end }}
{{- if eq .Values.tls.source "certManager" }}
{{- if not .Values.tls.certManager.issuerRef.name }}
{{- fail "tls.source=certManager needs tls.certManager.issuerRef.name: the cert-manager Issuer (or ClusterIssuer, with tls.certManager.issuerRef.kind) that signs every workload's certificate" }}
{{- end }}
{{- /* Certificates the API server cannot take would fail the install half-way (or never be issued). */}}
{{- if not (.Capabilities.APIVersions.Has "cert-manager.io/v1") }}
{{- fail "tls.source=certManager: this cluster does not serve cert-manager.io/v1 (cert-manager and its CRDs are not installed), so the chart's Certificates cannot be applied and no workload would get its certificate. Install cert-manager first, or set tls.source=existingSecrets with Secrets of your own (tls.existingSecrets). helm template knows no cluster: pass --api-versions cert-manager.io/v1 there" }}
{{- end }}
{{- else }}
{{- range $name := splitList " " (include "loupe.tlsWorkloads" .) }}
{{- if not (index $.Values.tls.existingSecrets $name) }}
{{- fail (printf "tls.source=existingSecrets needs tls.existingSecrets.%s: the Secret (tls.crt, tls.key, ca.crt) of that workload's certificate" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
