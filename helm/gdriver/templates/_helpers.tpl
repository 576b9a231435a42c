{{/*
Expand the name of the chart.
*/}}
{{- define "gdriver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
Truncated at 63 chars because some Kubernetes name fields are limited to this
(by the DNS naming spec). If the release name contains the chart name it is
used as the full name.
*/}}
{{- define "gdriver.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "gdriver.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "gdriver.labels" -}}
helm.sh/chart: {{ include "gdriver.chart" . }}
{{ include "gdriver.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker-supervisor
{{- end }}

{{/*
Selector labels
*/}}
{{- define "gdriver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gdriver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "gdriver.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gdriver.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository[:tag][@digest], tag defaulting to appVersion.
*/}}
{{- define "gdriver.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
Where the gdriver YAML is mounted in the container.
*/}}
{{- define "gdriver.configDir" -}}/etc/gdriver{{- end }}
{{- define "gdriver.configFile" -}}{{ include "gdriver.configDir" . }}/config.yml{{- end }}

{{/*
Ports gdriver listens on, read from the gdriver config (single source of truth).
*/}}
{{- define "gdriver.metricsPort" -}}
{{- if hasKey .Values.config "metrics_port" }}{{ .Values.config.metrics_port | int }}{{ else }}9464{{ end -}}
{{- end }}
{{- define "gdriver.consolePort" -}}
{{- if hasKey .Values.config "console_port" }}{{ .Values.config.console_port | int }}{{ else }}47300{{ end -}}
{{- end }}

{{/*
gdriver's drain time in whole seconds: GDRIVER_GRACEFUL_TIMEOUT from `env`
wins over config.graceful_timeout (as in gdriver itself); 30 is gdriver's default.
*/}}
{{- define "gdriver.gracefulTimeout" -}}
{{- $t := 30 -}}
{{- if hasKey .Values.config "graceful_timeout" -}}
{{- $t = .Values.config.graceful_timeout -}}
{{- end -}}
{{- if hasKey .Values.env "GDRIVER_GRACEFUL_TIMEOUT" -}}
{{- $t = .Values.env.GDRIVER_GRACEFUL_TIMEOUT -}}
{{- end -}}
{{- $t | float64 | ceil | int -}}
{{- end }}

{{/*
terminationGracePeriodSeconds: Kubernetes SIGKILLs the pod this long after
SIGTERM. It must outlast gdriver's drain (graceful_timeout) plus the longest
job, otherwise jobs die mid-flight. Computed unless set explicitly; an explicit
value that is too small fails the render.
*/}}
{{- define "gdriver.terminationGracePeriodSeconds" -}}
{{- $floor := add (include "gdriver.gracefulTimeout" . | int) (.Values.longestJobSeconds | int) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $floor 15 -}}
{{- else if le (.Values.terminationGracePeriodSeconds | int) $floor -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than graceful_timeout + longestJobSeconds (%d); leave it null to have it computed" (.Values.terminationGracePeriodSeconds | int) $floor) -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- end -}}
{{- end }}

{{/*
PromQL label matchers selecting this release's series, used by the alerts and
the autoscalers. Works with the ServiceMonitor and the PodMonitor, which both
attach `namespace` and `pod`. Override with `metricsSelector`.
*/}}
{{- define "gdriver.metricsSelector" -}}
{{- if .Values.metricsSelector -}}
{{- .Values.metricsSelector -}}
{{- else -}}
namespace="{{ .Release.Namespace }}",pod=~"{{ include "gdriver.fullname" . }}-[a-z0-9]+-[a-z0-9]+"
{{- end -}}
{{- end }}

{{/*
Matchers for the gearmand functions this release serves, appended to the
selector of the queue gauges: `,function=~"a|b"`, or nothing.
*/}}
{{- define "gdriver.functionMatcher" -}}
{{- with .functions -}}
,function=~"{{ range $i, $f := . }}{{ if $i }}|{{ end }}{{ $f | regexQuoteMeta | replace "\\" "\\\\" }}{{ end }}"
{{- end -}}
{{- end }}

{{/*
True when the KEDA ScaledObject is rendered (enabled and the API is served).
*/}}
{{- define "gdriver.kedaActive" -}}
{{- if and .Values.keda.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") -}}true{{- end -}}
{{- end }}

{{/*
True when something else (KEDA or the HPA) owns spec.replicas.
*/}}
{{- define "gdriver.autoscaled" -}}
{{- if or (include "gdriver.kedaActive" .) .Values.hpa.enabled -}}true{{- end -}}
{{- end }}
