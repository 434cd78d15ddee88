{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "paqet-dp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name. */}}
{{- define "paqet-dp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "paqet-dp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "paqet-dp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "paqet-dp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "paqet-dp.labels" -}}
helm.sh/chart: {{ include "paqet-dp.chart" . }}
{{ include "paqet-dp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.config.role | default "server" }}
{{- end -}}

{{/* Name of the Secret holding the shared key. */}}
{{- define "paqet-dp.secretName" -}}
{{- if .Values.secret.existingSecret -}}
{{- .Values.secret.existingSecret -}}
{{- else -}}
{{- printf "%s-key" (include "paqet-dp.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Where the daemon finds its files inside the container. */}}
{{- define "paqet-dp.configPath" -}}/etc/paqet-dp/config.toml{{- end -}}
{{- define "paqet-dp.keyDir" -}}/etc/paqet-dp/key{{- end -}}

{{/*
One TOML value: strings JSON-quoted (a valid TOML basic string), numbers as integers (Helm reads YAML
numbers as float64; every numeric config key is an integer), booleans, arrays of scalars.
*/}}
{{- define "paqet-dp.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- $v | toJson -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- int64 $v -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i }}, {{ end -}}{{- include "paqet-dp.tomlValue" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "config: unsupported value %v (%s)" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* True ("true") when v is a non-empty list of maps (a TOML array of tables). */}}
{{- define "paqet-dp.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}{{- if kindIs "map" (first .) -}}true{{- end -}}{{- end -}}
{{- end -}}

{{/*
A TOML table body: (list PATH MAP). Scalars first, then sub-tables `[path.k]` and arrays of tables
`[[path.k]]`, keys sorted. Null values are skipped (set a key to null to drop a default).
*/}}
{{- define "paqet-dp.tomlTable" -}}
{{- $path := index . 0 -}}
{{- $t := index . 1 -}}
{{- range $k, $v := $t -}}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) (not (include "paqet-dp.isTableArray" $v)) }}
{{ $k }} = {{ include "paqet-dp.tomlValue" $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := $t -}}
{{- $p := $k -}}
{{- if $path -}}{{- $p = printf "%s.%s" $path $k -}}{{- end -}}
{{- if kindIs "map" $v }}

[{{ $p }}]
{{- include "paqet-dp.tomlTable" (list $p $v) -}}
{{- else if include "paqet-dp.isTableArray" $v -}}
{{- range $e := $v }}

[[{{ $p }}]]
{{- include "paqet-dp.tomlTable" (list $p $e) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The daemon config: .Values.config plus what the chart owns (metrics.listen for the probes, a key
placeholder; the real key comes from the Secret through --key-file).
*/}}
{{- define "paqet-dp.configToml" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $transport := default dict (get $cfg "transport") -}}
{{- $kcp := default dict (get $transport "kcp") -}}
{{- $_ := set $kcp "key" "from-secret-via-key-file" -}}
{{- $_ := set $transport "kcp" $kcp -}}
{{- $_ := set $cfg "transport" $transport -}}
{{- $metrics := default dict (get $cfg "metrics") -}}
{{- $_ := set $metrics "listen" (printf "%s:%d" .Values.metrics.bindAddress (int .Values.metrics.port)) -}}
{{- $_ := set $cfg "metrics" $metrics -}}
# Rendered by the paqet-dp Helm chart from .Values.config; see docs/configuration.md.
# transport.kcp.key is a placeholder: the daemon reads the key from {{ include "paqet-dp.keyDir" . }}/{{ .Values.secret.secretKey }}.
{{- include "paqet-dp.tomlTable" (list "" $cfg) }}
{{ end -}}

{{/* The ConfigMap manifest (also hashed into the checksum/config pod annotation). */}}
{{- define "paqet-dp.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "paqet-dp.fullname" . }}
  labels:
    {{- include "paqet-dp.labels" . | nindent 4 }}
data:
  config.toml: |
    {{- include "paqet-dp.configToml" . | nindent 4 }}
{{- end -}}
